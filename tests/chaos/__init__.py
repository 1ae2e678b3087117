"""The chaos suite: weft as deployed (nginx in front of 3 `weft serve` replicas on a 3-node NATS
JetStream cluster with R3 streams, reference `weft agent`s), a client load of submits and cancels
plus WebSocket subscribers that resume with `fromSeq`, and rounds of faults: kill -9 of a replica
(the scheduling leader included), of a NATS node, of an agent, and connection cuts through
`tests.netproxy.NetProxy`. Afterwards the invariants are checked from the event stream and the
clients' own records (`tests.chaos.invariants`).

`python -m tests.chaos --rounds 50 [--seed N]` (`make chaos`) is the long run; the reduced run
is tests/integration/test_chaos.py, inside `make test`.
"""
