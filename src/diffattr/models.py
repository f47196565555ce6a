"""The diffusion model (diffusers UNet2DModel) and its DDPM noise schedule, built from the config."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from omegaconf import DictConfig, OmegaConf

# diffusers (and the torch._dynamo it imports) costs seconds to import: only the functions that build a model pay it,
# so Snakemake's parse and the jobs that only read tables start without it
if TYPE_CHECKING:
    from diffusers import DDPMScheduler, UNet2DModel


def build_unet(model_cfg: Mapping[str, Any], resolution: int, channels: int) -> UNet2DModel:
    """A fresh UNet2DModel for images of ``channels`` x ``resolution`` x ``resolution``."""
    from diffusers import UNet2DModel

    unet_cfg = model_cfg["unet"]
    if isinstance(unet_cfg, DictConfig):
        unet_cfg = OmegaConf.to_container(unet_cfg, resolve=True)
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in unet_cfg.items()}
    unet = UNet2DModel(sample_size=resolution, in_channels=channels, out_channels=channels, **kwargs)
    use_classic_attention(unet)
    return unet


def use_classic_attention(unet: UNet2DModel) -> None:
    # The default SDPA processor has no vmap rule on CPU, so per-sample gradients would silently take a slow path;
    # the classic processor is the same maths in plain matmuls/softmax and is what every kernel here is tested on.
    from diffusers.models.attention_processor import Attention, AttnProcessor

    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())


def build_scheduler(model_cfg: Mapping[str, Any]) -> DDPMScheduler:
    """DDPM noise schedule (Ho et al. 2020: T=1000, linear betas 1e-4..0.02), epsilon prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=int(model_cfg["num_train_timesteps"]),
        beta_schedule=str(model_cfg["beta_schedule"]),
        beta_start=float(model_cfg["beta_start"]),
        beta_end=float(model_cfg["beta_end"]),
        prediction_type="epsilon",
        clip_sample=True,
    )


def load_unet(path) -> UNet2DModel:
    """A UNet saved with ``save_pretrained`` (config.json + safetensors), with the classic attention processor."""
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(str(path), use_safetensors=True, low_cpu_mem_usage=False)
    use_classic_attention(unet)
    return unet
