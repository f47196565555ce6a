"""One job of a method family (``job.family=NAME``, ``job.shard=i``): its shard directory, written atomically."""

from diffattr.cli import entry
from diffattr.methods import run_job


@entry
def main(run, device):
    run_job(run, run.cfg.job.family, run.cfg.job.shard, device)


if __name__ == "__main__":
    main()
