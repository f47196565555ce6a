"""Load the configured dataset once and store both splits under ``<run>/data/{train,test}/``."""

from diffattr.cli import entry
from diffattr.data import load_dataset


@entry
def main(run, device):
    for split in ("train", "test"):
        images = load_dataset(run.cfg.data, split)
        images.save(run.dir / "data" / split)
        print(f"{split}: {len(images)} images {tuple(images.images.shape[1:])}")


if __name__ == "__main__":
    main()
