"""The dense score files of a sharded method family's job (``job.family=NAME``) from its shard directories."""

from diffattr.cli import entry
from diffattr.methods.jobs import merge_job


@entry("merge")
def main(run, device, plan):
    merge_job(run, run.cfg.job.family)


if __name__ == "__main__":
    main()
