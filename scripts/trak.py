"""TRAK or D-TRAK (``job.method=trak|dtrak``): features, lambda on held-out queries, scores."""

from diffattr.attribution import run_trak
from diffattr.cli import entry


@entry
def main(run, device):
    run_trak(run.cfg, run.dir, run.cfg.job.method, device)


if __name__ == "__main__":
    main()
