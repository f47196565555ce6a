"""The memory plan: the UNet counted from its config as diffusers builds it, estimates checked against budgets, the
query side of TracIn shrunk without changing a bit, refusals that name what to change, and mem_mb from the same
estimate."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffattr import memory
from diffattr.config import compose
from diffattr.exceptions import ConfigError
from diffattr.grads import num_trainable
from diffattr.kernels.tracin import query_gradients
from diffattr.models import build_scheduler, build_unet
from diffattr.resources import FLOOR_MB, job_resources

REPO = Path(__file__).resolve().parents[1]


def _layer_outputs_and_saved(unet, resolution, channels):
    """Per example: elements of every Conv2d / Linear / GroupNorm output, and the bytes autograd saves (batch 2
    minus batch 1, so the weights it saves cancel)."""
    counts = {}
    for batch in (1, 2):
        saved, outputs = {}, []

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        hooks = [m.register_forward_hook(lambda m, a, o: outputs.append(o.numel())) for m in unet.modules()
                 if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm))]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            unet(torch.randn(batch, channels, resolution, resolution), torch.tensor([10] * batch))
        for hook in hooks:
            hook.remove()
        counts[batch] = (sum(outputs), sum(saved.values()))
    return counts[2][0] - counts[1][0], counts[2][1] - counts[1][1]


@pytest.mark.parametrize("name, resolution, channels", [("micro", 8, 1), ("tiny", 16, 1), ("tiny", 32, 3),
                                                         ("ddpm_cifar10", 32, 3)])
def test_the_profile_counts_the_unet_as_diffusers_builds_it(name, resolution, channels):
    model = compose("smoke", [f"model={name}"]).cfg.model
    unet = build_unet(model, resolution, channels)
    prof = memory.unet_profile(model.unet, resolution, channels)
    outputs, saved = _layer_outputs_and_saved(unet, resolution, channels)
    assert prof.params == num_trainable(unet)
    assert prof.outputs == outputs
    assert prof.largest_layer == max(sum(p.numel() for p in m.parameters(recurse=False)) for m in unet.modules()
                                     if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm)))
    assert abs(prof.saved_bytes / saved - 1) < 0.1, (prof.saved_bytes, saved)
    assert prof.factors == sum((m.weight[0].numel() + (m.bias is not None)) ** 2 + m.weight.shape[0] ** 2
                               for m in unet.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))


def test_tracin_query_calls_shrink_to_fit_and_never_below_whole_chunks():
    cfg = compose("cifar10_paper").cfg  # 35.7M parameters, R = 16: 256-row calls are 110 GB of gradients
    full = memory.estimate("attribution", cfg, "tracin")
    step = math.lcm(memory.ENGINE_CHUNK, cfg.attribution.test_noises)
    smallest = memory.least("attribution", cfg, "tracin")
    assert smallest.sizes["rows_per_call"] == step
    assert smallest.total < full.total
    budget = (smallest.total + full.total) / 2
    planned = memory.plan("attribution", cfg, "tracin", budget=budget)
    rows = planned.sizes["rows_per_call"]
    assert rows % step == 0 and step <= rows < full.sizes["rows_per_call"] and planned.total <= budget
    assert memory.plan("attribution", cfg, "tracin", budget=full.total).sizes == full.sizes  # fits: untouched
    with pytest.raises(ConfigError) as refused:
        memory.plan("attribution", cfg, "tracin", budget=smallest.total - 1)
    message = str(refused.value)
    assert "attribution.block_size" in message and "job.memory_gb" in message and "query gradients" in message


def test_smaller_query_calls_give_bit_identical_gradients():
    cfg = compose("smoke").cfg
    unet, scheduler = build_unet(cfg.model, 8, 1), build_scheduler(cfg.model)
    torch.manual_seed(0)
    x0, ids, timesteps = torch.rand(2, 1, 8, 8) * 2 - 1, torch.tensor([3, 7]), torch.arange(0, 1000, 50)
    default = query_gradients(unet, scheduler, x0, ids, timesteps=timesteps, n_noise=16)  # 16 timesteps a call
    smaller = query_gradients(unet, scheduler, x0, ids, timesteps=timesteps, n_noise=16, rows_per_call=32)
    for field in ("raw", "normalized", "timestep_norms"):
        assert torch.equal(getattr(default, field), getattr(smaller, field)), field


@pytest.mark.parametrize("stage, family", [("train", ""), ("sample", ""), ("norm_study", ""),
                                           ("attribution", "tracin"), ("attribution", "trak"), ("attribution", "das"),
                                           ("attribution", "influence"), ("attribution", "magic"),
                                           ("validate", ""),
                                           ("removal", ""), ("merge", ""), ("report", ""), ("data", "")])
def test_cluster_memory_is_the_least_the_plan_can_run_in_with_its_margin(stage, family):
    for cfg in (compose("smoke").cfg, compose("cifar10_paper").cfg):
        need = job_resources(stage, cfg, family)["mem_mb"]
        assert need == max(FLOOR_MB, math.ceil((memory.least(stage, cfg, family).total * memory.MARGIN
                                                 + memory.JOBSTEP) / 1e6))
        assert memory.least(stage, cfg, family).total <= memory.estimate(stage, cfg, family).total


def test_a_job_over_its_budget_stops_before_any_work_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "experiment=smoke",
                           "job.memory_gb=0.3"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: the train job needs about 0.5")
    assert "budget is 0.30 GB" in proc.stderr and "train.batch_size" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "results").exists()


def test_a_family_plans_its_own_memory_and_one_without_a_hook_gets_the_generic_rule(monkeypatch):
    from diffattr.data import split_size
    from diffattr.methods import _REGISTRY, Family, families

    families()  # the built-in ones first, as any run has them

    def run(job):
        raise AssertionError("planning runs no job")

    hooked = Family(name="toy_hooked", variants={"toy_a": "a"}, run=run,
                    memory=lambda job: {"weights": 7.0, "toy table": 11.0 * job.n})
    plain = Family(name="toy_plain", variants={"toy_b": "b", "toy_c": "c"}, run=run)
    for family in (hooked, plain):
        monkeypatch.setitem(_REGISTRY, family.name, family)
    cfg = compose("smoke").cfg
    n, est = split_size(cfg.data, "train"), memory.estimate("attribution", cfg, "toy_hooked")
    assert {k: v for k, v in est.terms.items() if k not in ("base", "images")} == {"weights": 7.0, "toy table": 11.0 * n}
    terms = memory.estimate("attribution", cfg, "toy_plain").terms
    generic = memory.generic_terms(memory.JobSizes(cfg, memory.profile(cfg), n), variants=2)
    assert {k: v for k, v in terms.items() if k not in ("base", "images")} == generic
    assert terms != memory.estimate("attribution", cfg, "trak").terms  # never another family's plan
    assert job_resources("attribution", cfg, "toy_plain")["mem_mb"] >= FLOOR_MB
