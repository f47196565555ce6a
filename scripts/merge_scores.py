"""The dense score file of one method (``job.method=NAME``) from its family's shard directories."""

from diffattr.cli import entry
from diffattr.methods import merge_job


@entry
def main(run, device):
    merge_job(run, run.cfg.job.method)


if __name__ == "__main__":
    main()
