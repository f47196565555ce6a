"""Retrain without each case's removed images, regenerate its query and measure how far it moved, for the removal
cases at positions job.first_model..job.last_model (diffattr.removal)."""

from diffattr.cli import entry
from diffattr.removal import run_chunk


@entry("removal")
def main(run, device, plan):
    run_chunk(run.cfg, run.layout, run.cfg.job.first_model, run.cfg.job.last_model, device)


if __name__ == "__main__":
    main()
