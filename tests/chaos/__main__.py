"""`python -m tests.chaos [--rounds 50] [--seed N] [--workdir DIR]`: one chaos run, then the
invariant table; exit 1 when an invariant was violated (or the run could not finish)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

from tests.chaos.harness import Config
from tests.chaos.run import run_chaos
from tests.lb import available


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="kept after the run (default: a temp dir, removed)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if not available("nginx"):
        print("chaos: needs nginx (Debian package `nginx`)", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="weft-chaos-"))
    config = Config(rounds=args.rounds, seed=seed, workdir=workdir)
    try:
        report = asyncio.run(run_chaos(config))
    except Exception:
        traceback.print_exc()
        print(f"chaos: the run did not finish (seed {seed}, work dir {workdir})", file=sys.stderr)
        return 1
    print(report.table(), flush=True)
    problems = report.violations()
    for p in problems:
        print(f"VIOLATION: {p}", flush=True)
    for n in report.notes:
        print(f"note: {n}", flush=True)
    if args.workdir is None and not problems:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
