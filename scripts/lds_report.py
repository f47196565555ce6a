"""The run's linear datamodeling scores: tables/lds.csv, figures/lds.png and the plain arrays under lds/."""

from diffattr.cli import entry
from diffattr.validation import write_lds_report


@entry("lds_report")
def main(run, device, plan):
    write_lds_report(run.cfg, run.layout)


if __name__ == "__main__":
    main()
