"""Merge the norm-study shards into the run's tables and draw the two norm figures."""

from diffattr.cli import entry
from diffattr.norm_study import write_norm_report


@entry
def main(run, device):
    write_norm_report(run.cfg, run.layout)


if __name__ == "__main__":
    main()
