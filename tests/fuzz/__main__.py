"""`python -m tests.fuzz [--seed N] [--max-examples N] [--min-cases N]`: all three configurations, then
cases, failures and the seed; exit 1 on any failure or fewer cases than `--min-cases`."""

from __future__ import annotations

import argparse
import logging
import random
import sys

from tests.fuzz.runner import fuzz_all, report


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-examples", type=int, default=60)
    parser.add_argument("--min-cases", type=int, default=5000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    print(f"fuzz: seed {seed}, max-examples {args.max_examples} per operation and phase", flush=True)
    results = fuzz_all(seed, args.max_examples)
    print(report(results), flush=True)
    cases = sum(r.cases for r in results)
    if cases < args.min_cases:
        print(f"fuzz: only {cases} cases, fewer than {args.min_cases}", flush=True)
        return 1
    return 1 if any(r.failures for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
