"""Run every benchmark, each reporting its side-by-side ratios.

    .venv/bin/python benchmarks/run_all.py            # full size (10M rows), minutes
    .venv/bin/python benchmarks/run_all.py --smoke    # small, seconds (what CI may run)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="small data, quick")
    args = parser.parse_args()
    rows = "200000" if args.smoke else "10000000"
    runs = [
        [str(HERE / "data_plane.py"), "--rows", rows, "--repeat", "2" if args.smoke else "7"],
        [str(HERE / "privacy_engine.py"), "--rows", rows, "--repeat",
         "2" if args.smoke else "5"],
        [str(HERE / "sandbox_start.py"), "--rows", *([rows] if args.smoke else
                                                     ["1000000", "10000000"]),
         "--repeat", "3" if args.smoke else "7"],
    ]
    failed = 0
    for argv in runs:
        print(f"== {Path(argv[0]).name}", flush=True)
        failed += subprocess.call([sys.executable, *argv]) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
