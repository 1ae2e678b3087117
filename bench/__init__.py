"""`make bench`: weft's performance numbers against a fresh embedded nats-server, as one table.

Run as `python -m bench`. Knobs (environment):
  WEFT_BENCH_EVENTS            events in the restart row's stream (default 1,000,000; ~5 per work item)
  WEFT_BENCH_SKIP_NO_SNAPSHOT  1: skip the full-rebuild timing of the restart row
  WEFT_BENCH_RAW_MSGS          messages for the raw publish/replay rows (default 40,000)
  WEFT_BENCH_AWAITED_MSGS      messages for the awaited-publish row (default 1,000)
  WEFT_BENCH_REBUILD_ITEMS     work items for the projection-rebuild row (default 8,000 = 40k events)
  WEFT_BENCH_REST_REQUESTS     POST /api/work requests per round of the REST row (default 8,000)
  WEFT_BENCH_REST_CONCURRENCY  keep-alive connections, one request in flight each (default 128: where
                               submit throughput saturates on a 2-core machine; raw pipelined publish,
                               the reference, is a saturation rate too)
  WEFT_BENCH_ROUNDS            paired rounds for the two ratio targets (default 5): each round measures
                               the raw reference and weft a moment apart; the median ratio counts
  WEFT_BENCH_REST_SECONDS      stop issuing REST requests after this many seconds (default 45)
  WEFT_BENCH_LOAD_SYNC         lazy (default) | always: fsync policy while bulk-loading the 1M stream
                               (the server is then restarted with sync_interval always to measure)
  WEFT_BENCH_PROFILE           1: cProfile the rebuild and restart replicas and `weft serve`, print the
                               top functions to stderr (numbers are then slower: for diagnosis only)
  WEFT_BENCH_WS_CLIENTS        WebSocket clients of the fan-out row (default 500)
  WEFT_BENCH_HA_REQUESTS       POST /api/work per run of the nginx, R3/R1 and overhead rows (default 4,000)
  WEFT_BENCH_ONLY              comma list of sections to run: raw, rebuild, rest, workloop, ha, restart
                               (default all)
"""
