"""The fuzz suite of tests/fuzz, longer: seeded mutations of every format fusegrad reads, counts per outcome.

    python scripts/fuzz.py --cases 2000 [--seed 0] [--formats shard,tokenizer.bin]

Outcomes: ok (loaded and within range), refused (a documented fusegrad error), crash (any other exception),
accepted-bad (loaded out of range). Exits 1 when any case crashed or was accepted bad, listing examples.
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests.fuzz.formats import FORMATS  # noqa: E402
from tests.fuzz.mutate import run_format  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000, help="mutations per format (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mutations (default 0)")
    parser.add_argument("--formats", default="", help="comma-separated format names (default: all)")
    args = parser.parse_args(argv)
    chosen = [f for f in FORMATS
              if not args.formats or f[0] in args.formats.split(",")]
    bad = 0
    print(f"{'format':<22}{'ok':>8}{'refused':>9}{'crash':>7}{'accepted-bad':>14}")
    for fmt in chosen:
        with tempfile.TemporaryDirectory() as d:
            report = run_format(fmt, d, args.cases, seed=args.seed)
        c = report["counts"]
        print(f"{fmt[0]:<22}{c['ok']:>8}{c['refused']:>9}{c['crash']:>7}{c['accepted-bad']:>14}")
        for failure in report["failures"]:
            print(f"    {failure}")
        bad += c["crash"] + c["accepted-bad"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
