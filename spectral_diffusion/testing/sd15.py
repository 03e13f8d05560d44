"""SD 1.5-shaped models from the configs shipped in the package, with random weights: for benchmarks at the real
shapes and for tests of the shipped configs, with no download."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from spectral_diffusion.models import SD15_CONFIG_DIR


def sd15_pipeline(seed: int = 0, device: str | torch.device = "cpu") -> StableDiffusionPipeline:
    """SD 1.5's UNet, VAE, CLIP text encoder, tokenizer and scheduler, weights drawn from `seed` (fp32).

    `device="meta"` builds the modules without allocating weights (for shapes and parameter counts).
    """
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG_DIR / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG_DIR / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIG_DIR / "text_encoder"))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(SD15_CONFIG_DIR / "tokenizer"),
        unet=unet, scheduler=PNDMScheduler.from_pretrained(SD15_CONFIG_DIR / "scheduler"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
