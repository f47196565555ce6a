import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import diffattr.train as train_mod
from diffattr.checkpoints import CheckpointError, load_checkpoint_unet, read_index
from diffattr.config import compose
from diffattr.data import load_dataset
from diffattr.noise import TRAIN_DROPOUT, noise_from_seeds
from diffattr.train import TrainingError, train


def smoke_run(tmp_path, *overrides):
    return compose("smoke", [f"results_dir={tmp_path}", "train.epochs=3", *overrides])


def out(run):
    """The run's train stage directory (checkpoints/, train_log.parquet)."""
    return run.layout.path("train_log").parent


def weights(run_dir, ckpt="epoch_0003"):
    return load_file(str(run_dir / "checkpoints" / ckpt / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def train_set():
    return load_dataset(compose("smoke").cfg.data, "train")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, train_set):
    run = smoke_run(tmp_path_factory.mktemp("ref"))
    states = train(run.cfg, out(run), train_set, torch.device("cpu"))
    return run, states


def test_training_writes_checkpoints_index_and_replay_log(reference, train_set):
    run, states = reference
    assert [s.name for s in states] == ["epoch_0001", "epoch_0002", "epoch_0003"]
    assert [s.name for s in read_index(out(run) / "checkpoints")] == [s.name for s in states]
    for s in states:
        d = out(run) / "checkpoints" / s.name
        assert (d / "unet" / "config.json").exists() and (d / "optimizer.pt").exists()
    log = pd.read_parquet(out(run) / "train_log.parquet")
    assert set(log.columns) >= {"step", "epoch", "lr", "batch_size", "sample_id", "timestep", "noise_seed", "loss"}
    # every example is drawn exactly once per epoch
    for _, epoch in log.groupby("epoch"):
        assert sorted(epoch.sample_id) == sorted(train_set.ids.tolist())
    assert log.timestep.between(0, 999).all()


def test_replay_log_reproduces_the_training_loss(reference, train_set):
    run, states = reference
    log = pd.read_parquet(out(run) / "train_log.parquet")
    last = log[log.step == log.step.max()]
    # the weights before the last step are not stored, but the replayed noise must be the one the loss saw:
    # recompute the recorded per-example losses of the first step from a fresh model of the same seed
    first = log[log.step == 0]
    torch.manual_seed(run.cfg.train.seed)
    from diffattr.models import build_scheduler, build_unet

    unet = build_unet(run.cfg.model, run.cfg.data.resolution, run.cfg.data.channels)
    sched = build_scheduler(run.cfg.model)
    rows = [train_set.ids.tolist().index(i) for i in first.sample_id]
    x0 = train_set.images[rows]
    noise = noise_from_seeds(first.noise_seed.to_numpy(), x0.shape[1:])
    t = torch.as_tensor(first.timestep.to_numpy().copy())
    unet.train()
    torch.manual_seed(int(train_mod.derive_seeds(run.cfg.train.seed, TRAIN_DROPOUT, 0)))
    with torch.no_grad():
        loss = (unet(sched.add_noise(x0, noise, t), t).sample - noise).square().flatten(1).mean(1)
    torch.testing.assert_close(loss, torch.tensor(first.loss.to_numpy()), rtol=1e-5, atol=1e-6)
    assert len(last) > 0


def test_same_seed_gives_identical_weights_and_log(reference, tmp_path, train_set):
    run_a, _ = reference
    run_b = smoke_run(tmp_path)
    train(run_b.cfg, out(run_b), train_set, torch.device("cpu"))
    wa, wb = weights(out(run_a)), weights(out(run_b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    pd.testing.assert_frame_equal(pd.read_parquet(out(run_a) / "train_log.parquet"),
                                  pd.read_parquet(out(run_b) / "train_log.parquet"))


def test_other_seed_gives_other_weights(reference, tmp_path, train_set):
    run_b = smoke_run(tmp_path, "train.seed=1")
    train(run_b.cfg, out(run_b), train_set, torch.device("cpu"))
    wa, wb = weights(out(reference[0])), weights(out(run_b))
    assert not all(torch.equal(wa[k], wb[k]) for k in wa)


def test_unit_loss_weights_are_the_ordinary_training_bit_for_bit(reference, tmp_path, train_set):
    """Per-example weights (MAGIC's w, the zero-weight removal) normalise by the batch's length: w = 1 must be the
    batch mean exactly, and a zero weight must change the weights."""
    run_a, _ = reference
    ones = smoke_run(tmp_path / "ones")
    train(ones.cfg, out(ones), train_set, torch.device("cpu"), weights=torch.ones(len(train_set)))
    wa, wb = weights(out(run_a)), weights(out(ones))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    zeroed = torch.ones(len(train_set))
    zeroed[3] = 0.0
    zero = smoke_run(tmp_path / "zero")
    train(zero.cfg, out(zero), train_set, torch.device("cpu"), weights=zeroed)
    assert not all(torch.equal(wa[k], wz) for k, wz in weights(out(zero)).items())


def test_resume_after_interruption_is_bit_identical(reference, tmp_path, train_set, monkeypatch):
    run = smoke_run(tmp_path)
    real_save = train_mod.save_checkpoint
    calls = []

    def save_then_die(directory, *args):
        real_save(directory, *args)
        calls.append(directory)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during the third epoch's first instructions

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(run.cfg, out(run), train_set, torch.device("cpu"))
    assert not (out(run) / "train_log.parquet").exists()
    # a checkpoint directory half-written when the process died is a hidden temp dir: it must be ignored
    (out(run) / "checkpoints" / ".epoch_0003.abc.tmp").mkdir()
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    states = train(run.cfg, out(run), train_set, torch.device("cpu"))
    assert [s.name for s in states] == ["epoch_0001", "epoch_0002", "epoch_0003"]
    wa, wb = weights(out(reference[0])), weights(out(run))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    pd.testing.assert_frame_equal(pd.read_parquet(out(reference[0]) / "train_log.parquet"),
                                  pd.read_parquet(out(run) / "train_log.parquet"))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, train_set, monkeypatch):
    run = smoke_run(tmp_path)
    real_loss = train_mod.diffusion_loss
    steps = []

    def loss_turns_nan(pred, noise, kind):
        steps.append(1)
        out = real_loss(pred, noise, kind)
        return out * float("nan") if len(steps) > 4 else out  # 3 steps per epoch: dies in epoch 2

    monkeypatch.setattr(train_mod, "diffusion_loss", loss_turns_nan)
    with pytest.raises(TrainingError, match="epoch_0001"):
        train(run.cfg, out(run), train_set, torch.device("cpu"))
    assert (out(run) / "checkpoints" / "epoch_0001" / "state.json").exists()
    assert not (out(run) / "checkpoints" / "epoch_0002").exists()
    assert not (out(run) / "checkpoints" / "index.json").exists()


def test_truncated_checkpoint_is_a_clear_error(reference, tmp_path):
    import shutil

    src = out(reference[0]) / "checkpoints" / "epoch_0001"
    bad = tmp_path / "epoch_0001"
    shutil.copytree(src, bad)
    weights_file = bad / "unet" / "diffusion_pytorch_model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint_unet(bad)


def test_checkpoints_of_other_settings_are_not_resumed(reference, tmp_path, train_set):
    import shutil

    run = smoke_run(tmp_path)
    shutil.copytree(out(reference[0]) / "checkpoints", out(run) / "checkpoints")
    other = compose("smoke", [f"results_dir={tmp_path}", "train.epochs=3"]).cfg.copy()
    other.train.lr = 5e-4  # same directory, different training settings (e.g. a changed default)
    states = train(other, out(run), train_set, torch.device("cpu"))
    assert all(s.config_hash == train_mod.config_hash(other) for s in states)
