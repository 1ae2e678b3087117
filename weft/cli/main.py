"""The `weft` command: `weft serve [--embedded] [--demo-agent]`, `weft agent`, `weft replay`, the
fleet commands (submit, work, agents, targets, stats, dlq, watch) over the REST API, and
`weft completion bash|zsh` (argcomplete)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path

import orjson

from weft import aio, logs
from weft.cli.rest_commands import FLEET_COMMANDS, add_fleet_commands, run_fleet
from weft.cli.tokens import add_token_commands, run_tokens
from weft.core.access import TokenFileError
from weft.settings import Settings, SettingsError
from weft.store.embedded import EmbeddedNats, NatsServerConfig, die_with_parent
from weft.token_file import read_token_file

log = logging.getLogger("weft.cli.main")


DEMO_COMMAND = 'echo "progress: 50 thinking"; echo "demo agent did: $(cat)"'


async def _start_demo_agent(settings: Settings, url: str) -> asyncio.subprocess.Process:
    """One reference agent next to weft, so a new user sees work complete within seconds."""
    weft_bin = str(Path(sys.executable).parent / "weft")
    env = {**os.environ, "NATS_URL": url, "LOOMINAL_PROJECT_ID": settings.default_project}
    return await asyncio.create_subprocess_exec(
        weft_bin, "agent", "--guid", "demo-agent", "--handle", "demo", "--type", "claude-code",
        "--capabilities", "general,python,typescript,go,docs", "--boundaries", "*", "--max-tasks", "4",
        "--command", DEMO_COMMAND, env=env, start_new_session=True, preexec_fn=die_with_parent,
    )


async def _serve(settings: Settings, embedded: bool, demo_agent: bool = False) -> int:
    server: EmbeddedNats | None = None
    url = settings.nats_url
    if url is None and not embedded:
        url = "nats://127.0.0.1:4222"
    if embedded and settings.nats_url is None:
        server = EmbeddedNats(
            NatsServerConfig(store_dir=(settings.data_dir / "nats").resolve(), port=settings.embedded_nats_port),
            binary=settings.nats_server_bin,
        )
        await server.start()
        url = server.url
    elif embedded:
        log.info("NATS_URL is set: using it, not starting the bundled server")
    assert url is not None
    from weft.service import WeftService

    service = WeftService(settings)
    demo: asyncio.subprocess.Process | None = None
    stop = asyncio.Event()  # the first SIGTERM/SIGINT: drain, then stop
    now = asyncio.Event()  # a second one: cut the drain period short
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            now.set()
        else:
            stop.set()
            service.begin_drain()  # not ready from this instant, before anything else runs

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        starting = asyncio.create_task(service.start(url))
        waiter = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({starting, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if starting in done:
            starting.result()
            print(f"weft ready on http://{settings.api_host}:{service.port} (NATS {url})", flush=True)
            if demo_agent:
                demo = await _start_demo_agent(settings, url)
                print("demo agent running (capabilities general,python,typescript,go,docs)", flush=True)
            await waiter
        else:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
    finally:
        log.info("shutting down")
        if stop.is_set() and service.port is not None:  # it was serving: let the load balancer notice
            print(f"weft draining for {settings.drain_s:g}s (not ready; a second signal stops now)", flush=True)
            await service.drain(cut_short=now)
            print("weft stopping: finishing in-flight requests, then releasing leases", flush=True)
        if demo is not None and demo.returncode is None:
            demo.send_signal(signal.SIGTERM)  # graceful: it deregisters, then exits
            try:
                await asyncio.wait_for(demo.wait(), 15)
            except TimeoutError:
                demo.kill()
        try:
            await asyncio.wait_for(service.stop(), 20)  # in-flight requests, leases released, the rest
        except TimeoutError:
            log.warning("shutdown took too long; exiting anyway")
        if server is not None:
            await server.stop()
    return 0


async def _replay(settings: Settings, project: str, start: int, end: int | None, raw: bool) -> int:
    from projections import ProjectState, apply, state_hash
    from weft.service import connect_nats
    from weft.store.eventstore import EventStore

    nc = await connect_nats(settings, settings.nats_url or "nats://127.0.0.1:4222")
    try:
        store = EventStore(nc.jetstream())
        state = ProjectState(project=project)
        count = 0
        async for ev in store.read_range(project, 1, end):
            apply(state, ev)
            count += 1
            if ev.seq >= start and raw:
                sys.stdout.write(orjson.dumps(ev.to_dict()).decode() + "\n")
        summary = {"project": project, "seq": state.seq, "events": count, "state_hash": state_hash(state),
                   "work": state.work_counts, "agents": len(state.agents), "targets": len(state.targets)}
        sys.stdout.write(orjson.dumps(summary).decode() + "\n")
    finally:
        await nc.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weft", description="Event-sourced coordinator for AI coding agents")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a weft replica (REST API + projections)")
    serve.add_argument("--insecure", action="store_true",
                       help="serve an open API (no tokens) on a non-loopback API_HOST; logged as a warning")
    serve.add_argument("--embedded", action="store_true", help="start the bundled nats-server unless NATS_URL is set")
    serve.add_argument("--demo-agent", action="store_true",
                       help="also run one reference agent that echoes its task (the `make run` demo)")
    replay = sub.add_parser("replay", help="fold a project's stream up to a sequence and print the state hash "
                                           "(subcommands: state, diff, export, hash; docs/replay.md)")
    replay.add_argument("--project")
    replay.add_argument("--from-seq", type=int, default=1, help="print events from this sequence (with --events)")
    replay.add_argument("--to-seq", type=int, default=None)
    replay.add_argument("--events", action="store_true", help="print each event as a JSON line")
    from weft.cli.replay import add_replay_commands

    add_replay_commands(sub, replay)
    from weft.agent.main import add_arguments as add_agent_arguments

    add_agent_arguments(sub.add_parser("agent", help="run the reference agent: run a command per work item"))
    add_fleet_commands(sub)
    add_token_commands(sub)
    completion = sub.add_parser("completion", help="print the shell completion script (bash or zsh)",
                                description='bash: eval "$(weft completion bash)" in ~/.bashrc; '
                                            'zsh: eval "$(weft completion zsh)" in ~/.zshrc')
    completion.add_argument("shell", choices=["bash", "zsh"])
    return parser


def completion_script(shell: str) -> str:
    """argcomplete's registration of `weft` for the shell (its `shellcode`)."""
    from argcomplete.shell_integration import shellcode

    return str(shellcode(["weft"], shell=shell))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if argv is None and "_ARGCOMPLETE" in os.environ:  # a shell asking for completions: answer, exit
        import argcomplete

        argcomplete.autocomplete(parser)
    args = parser.parse_args(argv)
    if args.command == "completion":
        sys.stdout.write(completion_script(args.shell))
        return 0
    if args.command == "agent":  # a separate program with its own settings (weft/agent/settings.py)
        from weft.agent.main import run as run_agent

        return run_agent(args)
    if args.command == "tokens":
        return run_tokens(args)
    if args.command in FLEET_COMMANDS:  # clients of the REST API: no server settings needed
        try:
            return asyncio.run(run_fleet(args, os.environ))
        except KeyboardInterrupt:  # Ctrl-C: the way to leave `weft watch`
            return 0 if args.command == "watch" else 130
    try:
        settings = Settings.from_env()
    except SettingsError as err:
        print(f"weft: configuration error: {err}", file=sys.stderr)
        return 2
    # A server logs at LOG_LEVEL (info by default); a one-shot command's output is its answer, so
    # it logs warnings and worse unless LOG_LEVEL asks for more.
    level = settings.log_level if args.command == "serve" or os.environ.get("LOG_LEVEL") else "warning"
    logs.configure(level, settings.log_format)
    if args.command == "serve":
        if args.insecure:
            settings = dataclasses.replace(settings, insecure=True)
        problem = settings.exposure_problem()
        if problem is not None:
            print(f"weft: refusing to start: {problem}", file=sys.stderr)
            return 2
        if settings.tokens_file is not None:
            try:
                read_token_file(settings.tokens_file)
            except TokenFileError as err:
                print(f"weft: configuration error: WEFT_TOKENS_FILE: {err}", file=sys.stderr)
                return 2
        return aio.run(_serve(settings, args.embedded, args.demo_agent), use_uvloop=settings.uvloop)
    if args.command == "events" or (args.command == "replay" and args.replay_command not in (None, "hash")):
        from weft.cli.replay import run as run_replay

        return asyncio.run(run_replay(settings, args))
    if args.command == "replay":
        if not args.project:
            print("weft: replay: --project is required", file=sys.stderr)
            return 2
        return asyncio.run(_replay(settings, args.project, args.from_seq, args.to_seq, args.events))
    return 2


if __name__ == "__main__":
    sys.exit(main())
