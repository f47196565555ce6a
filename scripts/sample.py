"""Generate the run's query images at one checkpoint (``job.checkpoint=epoch_XXXX``) from fixed seeds."""

from diffattr.cli import entry
from diffattr.sampling import write_samples


@entry("sample")
def main(run, device, plan):
    write_samples(run.cfg, run.layout, run.cfg.job.checkpoint, device)


if __name__ == "__main__":
    main()
