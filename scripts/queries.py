"""Choose the attribution queries: training images, held-out images and the run's generated samples."""

from diffattr.checkpoints import read_index
from diffattr.cli import entry
from diffattr.queries import build_queries


@entry("queries")
def main(run, device, plan):
    build_queries(run.cfg, run.layout, read_index(run.layout.path("checkpoint_index").parent)[-1].name)


if __name__ == "__main__":
    main()
