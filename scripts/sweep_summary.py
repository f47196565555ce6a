"""The summary table and figure of a sweep, from its runs' directories (called by the DAG's sweep_summary and
sweep_lds rules)."""

import argparse
from pathlib import Path

from diffattr.sweep import write_summary

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--table", type=Path, required=True)
    parser.add_argument("--figure", type=Path, required=True)
    parser.add_argument("--keys", default="", help="the swept keys, comma-separated")
    parser.add_argument("--lds", action="store_true", help="summarise the runs' LDS tables instead")
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    write_summary(args.runs, [k for k in args.keys.split(",") if k], args.table, args.figure, lds=args.lds)
