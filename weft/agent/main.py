"""`weft agent`: the reference agent. Registers with weft, runs `--command` for every work item.

    weft agent --project P --capabilities python,review --boundaries personal --type claude-code \\
        --max-tasks 2 --command "claude -p \\"$(cat)\\"" --idle-exit 600 --label team=core

Exit codes: 0 after a shutdown (weft's, SIGTERM/SIGINT, or --idle-exit); 1 if NATS could not be
reached within --connect-timeout; 2 for bad configuration or a refused registration.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from weft import aio, logs
from weft.agent.settings import DEFAULT_RECOVERABLE_EXIT_CODES, AgentSettings, AgentSettingsError
from weft.store.connection import agent_inbox_prefix, redact_secrets, redact_url

log = logging.getLogger("weft.agent")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--project", help="project id (default: LOOMINAL_PROJECT_ID, else 'default')")
    # Spin-up mechanisms pass the target's declaration as WEFT_AGENT_* variables: flags win over them.
    parser.add_argument("--capabilities", help="comma-separated capabilities, e.g. python,review "
                        "(default: WEFT_AGENT_CAPABILITIES)")
    parser.add_argument("--boundaries", help="comma-separated boundaries; '*' = any allowed "
                        "(default: WEFT_AGENT_BOUNDARIES, else '*')")
    parser.add_argument("--type", help="agent type (default: WEFT_AGENT_TYPE, else claude-code)")
    parser.add_argument("--max-tasks", type=int, default=1, help="items run at the same time (default: 1)")
    # dest is not "command": `weft`'s subparsers already store the subcommand's name there
    parser.add_argument("--command", dest="agent_command", metavar="CMD",
                        help="shell command run per item: description on stdin, WEFT_WORK_* in its environment "
                        "(default: WEFT_AGENT_COMMAND)")
    parser.add_argument("--guid", help="agent id (default: WEFT_AGENT_GUID, else derived from host+project+type+capabilities)")
    parser.add_argument("--handle", help="human-readable name shown in weft")
    parser.add_argument("--idle-exit", type=float, default=0.0, metavar="SECONDS",
                        help="deregister and exit after holding no work this long (0 = never, default)")
    parser.add_argument("--heartbeat-ms", type=int, default=None, help="heartbeat interval (default: from weft)")
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="a label (repeatable)")
    parser.add_argument("--recoverable-exit-codes", default=",".join(str(c) for c in sorted(DEFAULT_RECOVERABLE_EXIT_CODES)),
                        help="exit codes reported as recoverable failures (default: 75, EX_TEMPFAIL)")
    parser.add_argument("--kill-grace", type=float, default=10.0, metavar="SECONDS",
                        help="SIGTERM to SIGKILL delay when a command is stopped (default: 10)")
    parser.add_argument("--request-timeout", type=float, default=5.0, metavar="SECONDS",
                        help="timeout of one protocol request attempt (default: 5)")
    parser.add_argument("--connect-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="give up if NATS is not reachable at start within this (0 = wait forever; default: 60)")
    parser.add_argument("--workdir", default=None, help="working directory of the command (default: the agent's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weft agent", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser


async def run_agent(settings: AgentSettings) -> int:
    from weft.agent.client import AgentClient
    from weft.agent.runner import AgentRunner, StopRequest

    client = AgentClient(
        settings.project, settings.guid,
        request_timeout_s=settings.request_timeout_s, max_backoff_s=settings.max_backoff_s,
    )
    try:
        await client.connect(
            settings.nats_url, user=settings.nats_user, password=settings.nats_pass,
            connect_timeout_s=settings.connect_timeout_s, auth=settings.nats_auth,
            inbox_prefix=agent_inbox_prefix(settings.project),
        )
    except Exception as err:
        log.error("cannot connect to NATS at %s: %s", redact_url(settings.nats_url),
                  redact_secrets(repr(err), settings.nats_auth.secrets()))
        return 1
    runner = AgentRunner(settings, client)
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        # The first signal drains gracefully; a second one forces.
        graceful = runner.stop_request is None
        runner.request_stop(StopRequest(graceful, f"received {sig.name}"))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await runner.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await client.close()


def run(args: argparse.Namespace) -> int:
    """Entry from `weft agent` (weft/cli/main.py) with the parsed flags."""
    try:
        settings = AgentSettings.from_args(args)
    except AgentSettingsError as err:
        print(f"weft agent: configuration error: {err}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    return aio.run(run_agent(settings), use_uvloop=settings.uvloop)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
