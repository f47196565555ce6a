"""One job of a method family (``job.family=NAME``, ``job.shard=i``): its shard directory, written atomically."""

from diffattr.cli import entry
from diffattr.methods.jobs import run_job


@entry("attribution")
def main(run, device, plan):
    run_job(run, run.cfg.job.family, run.cfg.job.shard, device, plan.sizes)


if __name__ == "__main__":
    main()
