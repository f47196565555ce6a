"""Merge TracIn shards, then write every attribution table and figure."""

from diffattr.attribution import merge_tracin
from diffattr.cli import entry
from diffattr.report import write_report


@entry
def main(run, device):
    merge_tracin(run.cfg, run.dir)
    write_report(run.cfg, run.dir)


if __name__ == "__main__":
    main()
