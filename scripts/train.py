"""Train (or resume) the run's DDPM: checkpoints, replay log ``train_log.parquet``, ``checkpoints/index.json``."""

from diffattr.cli import entry
from diffattr.data import ImageSet
from diffattr.train import train


@entry
def main(run, device):
    states = train(run.cfg, run.dir, ImageSet.load(run.dir / "data" / "train"), device)
    print(f"{len(states)} checkpoints: {', '.join(s.name for s in states)}; final loss {states[-1].mean_loss:.4f}")


if __name__ == "__main__":
    main()
