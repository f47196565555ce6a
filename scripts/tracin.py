"""Diffusion-TracIn / ReTrac scores of every query against one shard (``job.shard=i``) of the training set."""

from diffattr.attribution import run_tracin
from diffattr.cli import entry


@entry
def main(run, device):
    run_tracin(run.cfg, run.dir, run.cfg.job.shard, device)


if __name__ == "__main__":
    main()
