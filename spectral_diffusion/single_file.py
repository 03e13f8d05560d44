"""SD 1.x single files: writing a diffusers pipeline in the original LDM key layout, and checking a file is one.

Reading is diffusers' own `from_single_file` (see `models.py`); the writer here is its exact inverse, so a fused
model can be shared as the one `.safetensors` file that A1111 / ComfyUI users expect, and tests can build one.
Key layout (CompVis `ldm`): `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE),
`cond_stage_model.transformer.text_model.*` (CLIP text encoder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import CLIPTextModel

from spectral_diffusion.atomic import atomic_write
from spectral_diffusion.errors import SpectralDiffusionError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."

# diffusers ResnetBlock2D parameter names -> LDM ResBlock names.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_TOP = {"conv_norm_out": "norm_out"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_head(rest: str, table: dict[str, str]) -> str:
    """Rename the leading module path of `rest` if `table` has it (e.g. `to_out.0.weight` -> `proj_out.weight`)."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def _unet_key(key: str, config: Any) -> str:
    """One diffusers UNet2DConditionModel key in LDM `openaimodel.UNetModel` naming."""
    top = _rename_head(key, _UNET_TOP)
    if top != key:
        return top
    parts = key.split(".")
    if parts[0] == "mid_block":  # LDM: resnet, attention, resnet
        tail = ".".join(parts[3:])
        if parts[1] == "attentions":
            return f"middle_block.1.{tail}"
        return f"middle_block.{2 * int(parts[2])}.{_rename_head(tail, _UNET_RESNET)}"
    block, kind, index, tail = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
    per_block = config.layers_per_block + 1  # down: resnets + a downsampler slot; up: one more resnet
    if parts[0] == "down_blocks":
        first = 1 + block * per_block
        if kind == "downsamplers":
            return f"input_blocks.{first + config.layers_per_block}.0.op.{tail.removeprefix('conv.')}"
        slot = f"input_blocks.{first + index}"
    elif parts[0] == "up_blocks":
        first = block * per_block
        if kind == "upsamplers":  # after the last resnet, and after its attention when the block has one
            after = 2 if "CrossAttn" in config.up_block_types[block] else 1
            return f"output_blocks.{first + config.layers_per_block}.{after}.{tail}"
        slot = f"output_blocks.{first + index}"
    else:
        raise ValueError(f"no LDM name for UNet parameter {key!r}")
    if kind == "resnets":
        return f"{slot}.0.{_rename_head(tail, _UNET_RESNET)}"
    return f"{slot}.1.{tail}"


def unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The UNet's state dict in LDM naming."""
    return {UNET_PREFIX + _unet_key(k, unet.config): v for k, v in unet.state_dict().items()}


def _vae_key(key: str, num_blocks: int) -> str:
    """One diffusers AutoencoderKL key in LDM naming (LDM numbers decoder levels from the bottom)."""
    coder, _, rest = key.partition(".")
    if coder not in ("encoder", "decoder"):  # quant_conv, post_quant_conv
        return key
    parts = rest.split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        side = parts[0].removesuffix("_blocks")
        level = int(parts[1]) if side == "down" else num_blocks - 1 - int(parts[1])
        tail = ".".join(parts[4:])
        if parts[2] == "resnets":
            return f"{coder}.{side}.{level}.block.{parts[3]}.{_rename_head(tail, _VAE_RESNET)}"
        return f"{coder}.{side}.{level}.{side}sample.{tail}"
    if parts[0] == "mid_block":
        tail = ".".join(parts[3:])
        if parts[1] == "resnets":
            return f"{coder}.mid.block_{int(parts[2]) + 1}.{_rename_head(tail, _VAE_RESNET)}"
        return f"{coder}.mid.attn_1.{_rename_head(tail, _VAE_ATTN)}"
    return f"{coder}.{_rename_head(rest, _VAE_TOP)}"


def vae_to_ldm(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """The VAE's state dict in LDM naming; mid-block attention projections become 1x1 convs as in LDM."""
    num_blocks = len(vae.config.block_out_channels)
    out: dict[str, torch.Tensor] = {}
    for key, value in vae.state_dict().items():
        name = _vae_key(key, num_blocks)
        if ".mid.attn_1." in name and value.ndim == 2:
            value = value[:, :, None, None]
        out[VAE_PREFIX + name] = value
    return out


def clip_to_ldm(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """The text encoder's weights under `cond_stage_model.transformer.text_model.` (SD 1.x's FrozenCLIPEmbedder)."""
    return {CLIP_PREFIX + k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}


def pipeline_to_ldm(
    pipe: StableDiffusionPipeline, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """UNet, VAE and text encoder in one SD 1.x LDM state dict (contiguous CPU tensors, optionally cast)."""
    merged = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae), **clip_to_ldm(pipe.text_encoder)}
    return {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in merged.items()}


def save_single_file(
    pipe: StableDiffusionPipeline, path: str | Path, dtype: torch.dtype | None = None
) -> Path:
    """Write `pipe` as one SD 1.x `.safetensors` checkpoint (atomically)."""
    state = pipeline_to_ldm(pipe, dtype)
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))


def check_sd1_single_file(path: str | Path) -> None:
    """Refuse a `.safetensors` file that is not a full SD 1.x checkpoint, naming what it looks like instead."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as exc:
        raise SpectralDiffusionError(f"{path}: not a readable .safetensors file ({exc})") from exc
    has = {p: any(k.startswith(p) for k in keys) for p in (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX)}
    if all(has.values()):
        return
    if any(k.startswith("conditioner.embedders.") for k in keys):
        reason = "it looks like an SDXL checkpoint"
    elif any(k.startswith("cond_stage_model.model.") for k in keys):
        reason = "it looks like SD 2.x (OpenCLIP text encoder): load its diffusers folder instead"
    elif any("lora" in k.lower() for k in keys):
        reason = "it looks like a LoRA, not a base model"
    else:
        reason = "no " + ", ".join(f"{p}*" for p, ok in has.items() if not ok) + " weights"
    raise SpectralDiffusionError(f"{path}: not an SD 1.x single-file checkpoint ({reason})")
