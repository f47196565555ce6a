"""The run's counterfactual removal: tables/removal.csv, tables/removal_summary.csv and figures/removal.png."""

from diffattr.cli import entry
from diffattr.removal import write_removal_report


@entry("removal_report")
def main(run, device, plan):
    write_removal_report(run.cfg, run.layout)


if __name__ == "__main__":
    main()
