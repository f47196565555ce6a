"""Journey-TRAK: per-sampling-step scores of the generated queries."""

from diffattr.attribution import run_journey_trak
from diffattr.cli import entry


@entry
def main(run, device):
    run_journey_trak(run.cfg, run.dir, device)


if __name__ == "__main__":
    main()
