"""Train (or resume) the run's DDPM: checkpoints, their index and the replay log, in the run's train stage."""

from diffattr.cli import entry
from diffattr.data import ImageSet
from diffattr.train import train


@entry("train")
def main(run, device, plan):
    train_set = ImageSet.load(run.layout.path("data", split="train"))
    states = train(run.cfg, run.layout.path("train_log").parent, train_set, device)
    print(f"{len(states)} checkpoints: {', '.join(s.name for s in states)}; final loss {states[-1].mean_loss:.4f}")


if __name__ == "__main__":
    main()
