#!/usr/bin/env python
"""Run every fusegrad ANE kernel on this Mac's Neural Engine against ane-sim: `fusegrad doctor` with sizes.

    python scripts/ane_verify.py             # stories110M sizes (DIM 768, HIDDEN 2048, SEQ 64, 12 heads)
    python scripts/ane_verify.py --small     # the doctor's sizes (DIM 256, HIDDEN 512, SEQ 96, 8 / 4 heads)
    python scripts/ane_verify.py --sim-only  # no ANE needed: checks this script anywhere (sim vs sim)

Prints the doctor's report (chip, macOS, per kernel compile / load / eval, max |ANE - ane-sim| and the
bound); exits 1 if any kernel fails or exceeds the bound, 2 if the ANE is unavailable.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fusegrad.backends.ane import AneSim, available  # noqa: E402
from fusegrad.backends.ane.doctor import SIZES, STORIES110M, doctor, format_report  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the doctor's small shapes (fast)")
    parser.add_argument("--sim-only", action="store_true", help="compare ane-sim with itself (no ANE needed)")
    args = parser.parse_args(argv)
    ok, reason = available()
    if not ok and not args.sim_only:
        print(f"ANE unavailable: {reason}")
        return 2
    report = doctor(AneSim(hw_rules=True) if args.sim_only else None, sizes=SIZES if args.small else STORIES110M)
    print(format_report(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
