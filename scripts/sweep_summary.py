"""The summary table and figure of a sweep, from its runs' directories (called by the DAG's sweep_summary and
sweep_lds rules)."""

import argparse
from pathlib import Path

from diffattr.atomic import write_csv
from diffattr.figures.style import save
from diffattr.figures.sweep import lds_summary_figure, summary_figure
from diffattr.sweep import lds_summary_table, summary_table

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--table", type=Path, required=True)
    parser.add_argument("--figure", type=Path, required=True)
    parser.add_argument("--keys", default="", help="the swept keys, comma-separated")
    parser.add_argument("--lds", action="store_true", help="summarise the runs' LDS tables instead")
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    keys = [k for k in args.keys.split(",") if k]
    make_table, make_figure = (lds_summary_table, lds_summary_figure) if args.lds else (summary_table, summary_figure)
    table = make_table(args.runs, keys)
    write_csv(table, args.table)
    save(make_figure(table, keys), args.figure)
