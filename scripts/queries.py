"""Choose the attribution queries: training images, held-out images and the run's generated samples."""

from diffattr.attribution import build_queries
from diffattr.checkpoints import read_index
from diffattr.cli import entry


@entry
def main(run, device):
    build_queries(run.cfg, run.dir, read_index(run.dir / "checkpoints")[-1].name)


if __name__ == "__main__":
    main()
