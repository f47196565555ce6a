"""Self-describing training checkpoints: weights (diffusers ``save_pretrained``), optimizer, EMA, state and replay.

Layout of one checkpoint directory ``checkpoints/epoch_0005/``:
``unet/`` (config.json + safetensors), ``ema/`` (when EMA is on), ``optimizer.pt``, ``replay.parquet`` (the replay
rows of the epochs since the previous checkpoint) and ``state.json`` (epoch, step, lr, batch size, N, config hash).
Each directory is written atomically, so a directory that exists is complete.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from .atomic import atomic_path, write_text
from .exceptions import CheckpointError
from .models import load_unet


@dataclass(frozen=True)
class CheckpointState:
    name: str
    epoch: int
    step: int
    lr: float  # learning rate of the last step before the checkpoint
    batch_size: int
    n_train: int
    config_hash: str
    mean_loss: float  # mean training loss over the epochs since the previous checkpoint


def checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def checkpoint_epochs(epochs: int, every: int) -> list[int]:
    """Epochs after which a checkpoint is saved: every ``every`` epochs, and always the last one."""
    out = list(range(every, epochs + 1, every))
    if not out or out[-1] != epochs:
        out.append(epochs)
    return out


def save_checkpoint(directory: Path, state: CheckpointState, unet, optimizer, ema, replay: pd.DataFrame) -> None:
    import torch  # here, not at the top: the workflow imports this module when it parses

    with atomic_path(directory, suffix="") as tmp:
        tmp.mkdir()
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        if ema is not None:
            torch.save(ema.state_dict(), tmp / "ema.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        replay.to_parquet(tmp / "replay.parquet", index=False)
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))


def read_state(directory: Path) -> CheckpointState:
    try:
        return CheckpointState(**json.loads((Path(directory) / "state.json").read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {directory} is unreadable ({e}); delete it to retrain from the "
                              "previous checkpoint") from None


def load_checkpoint_unet(directory: Path, ema: bool = False):
    """The UNet of a checkpoint (the EMA weights when ``ema`` and the checkpoint has them)."""
    directory = Path(directory)
    try:
        unet = load_unet(directory / "unet")
        if ema and (directory / "ema.pt").exists():
            import torch
            from diffusers.training_utils import EMAModel

            shadow = EMAModel(unet.parameters())
            shadow.load_state_dict(torch.load(directory / "ema.pt", weights_only=True))
            shadow.copy_to(unet.parameters())
    except (OSError, ValueError, RuntimeError, EnvironmentError) as e:
        raise CheckpointError(f"checkpoint {directory} is truncated or corrupt ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); delete it and rerun training") from None
    return unet


def write_index(checkpoint_dir: Path, states: list[CheckpointState]) -> None:
    write_text(checkpoint_dir / "index.json", json.dumps([asdict(s) for s in states], indent=2))


def last_checkpoint(checkpoint_dir: Path) -> Path:
    """The directory of the last checkpoint that ``checkpoint_dir``'s index lists."""
    return Path(checkpoint_dir) / read_index(checkpoint_dir)[-1].name


def read_index(checkpoint_dir: Path) -> list[CheckpointState]:
    path = Path(checkpoint_dir) / "index.json"
    try:
        return [CheckpointState(**row) for row in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path} is missing or unreadable ({e}); rerun the train rule") from None
