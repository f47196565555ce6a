"""Load the configured dataset once and store both splits in the run's data stage."""

from diffattr.cli import entry
from diffattr.data import SPLITS, load_dataset


@entry("data")
def main(run, device, plan):
    for split in SPLITS:
        images = load_dataset(run.cfg.data, split)
        images.save(run.layout.path("data", split=split))
        print(f"{split}: {len(images)} images {tuple(images.images.shape[1:])}")


if __name__ == "__main__":
    main()
