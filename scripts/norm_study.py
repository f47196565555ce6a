"""Gradient norms of one shard of the training set (``job.shard=i``) at every checkpoint: grid and recorded."""

from diffattr.cli import entry
from diffattr.norm_study import compute_shard


@entry("norm_study")
def main(run, device, plan):
    compute_shard(run.cfg, run.layout, run.cfg.job.shard, device)


if __name__ == "__main__":
    main()
