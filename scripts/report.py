"""Every attribution table and figure of the run, from the dense score files of its methods."""

from diffattr.cli import entry
from diffattr.report import write_report


@entry("report")
def main(run, device, plan):
    write_report(run.cfg, run.layout)


if __name__ == "__main__":
    main()
