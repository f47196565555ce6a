"""Merge the norm-study shards into the run's tables and draw the two norm figures."""

from diffattr.cli import entry
from diffattr.norm_study import write_norm_report


@entry("norm_report")
def main(run, device, plan):
    write_norm_report(run.cfg, run.layout)


if __name__ == "__main__":
    main()
