"""Which layers get adapters: presets and glob patterns over qualified layer names.

Qualified names are ``unet.<module path>`` and ``text_encoder.<module path>`` (docs/architecture.md).
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from spectral_diffusion.adapters.layers import AdapterLayer, is_adaptable
from spectral_diffusion.errors import SpectralDiffusionError

_TEXT_ATTN = ("text_encoder.*.self_attn.[qkv]_proj", "text_encoder.*.self_attn.out_proj")
_CROSS_KV = ("unet.*.attn2.to_[kv]",)  # cross-attention keys and values: the UNet layers that read only the text
_ATTN = (
    "unet.*.attn[12].to_[qkv]",
    "unet.*.attn[12].to_out.0",
    *_TEXT_ATTN,
)
_ATTN_FF = (
    *_ATTN,
    "unet.*.ff.net.0.proj",  # the Linear inside diffusers' GEGLU
    "unet.*.ff.net.2",
    "unet.*.proj_in",  # 1x1 Conv2d in SD 1.x, Linear in SD 2.x-style configs
    "unet.*.proj_out",
    "text_encoder.*.mlp.fc1",
    "text_encoder.*.mlp.fc2",
)
PRESETS: dict[str, tuple[str, ...]] = {
    # The text pathway only (Custom Diffusion's choice, plus the text encoder's attention): every adapted layer sees
    # the prompt and nothing else, so a concept acts only where its token is, and fuses in closed form from text
    # encodings alone (fusion method `closed-form`).
    "kv": (*_CROSS_KV, *_TEXT_ATTN),
    "attn": _ATTN,
    "attn+ff": _ATTN_FF,
    # + the UNet's 3x3 convolutions (resnets, down- and upsamplers), kohya's conv_dim / LyCORIS LoCon: where local
    # appearance (texture, colour layout) is drawn. conv_in / conv_out stay frozen, as in those tools.
    "attn+ff+conv": (
        *_ATTN_FF,
        "unet.*.resnets.*.conv[12]",
        "unet.*.resnets.*.conv_shortcut",
        "unet.*samplers.*.conv",
    ),
}


def is_text_fed(name: str) -> bool:
    """True for layers whose input is the prompt's encoding alone: the text encoder's and the cross-attention
    keys / values. Their outputs for any prompt follow from text encodings, without sampling an image."""
    return name.startswith("text_encoder.") or any(fnmatchcase(name, p) for p in _CROSS_KV)


def components(unet: nn.Module | None, text_encoder: nn.Module | None) -> dict[str, nn.Module]:
    """The given models by their layer-name prefix."""
    return {prefix: m for prefix, m in (("unet", unet), ("text_encoder", text_encoder)) if m is not None}


def adaptable_layers(unet: nn.Module | None, text_encoder: nn.Module | None) -> dict[str, nn.Module]:
    """Every Linear / Conv2d (or existing adapter wrapper) by qualified name, not looking inside wrappers.

    A LoRA that diffusers' `load_lora_weights` put on a layer (a PEFT tuner layer) is looked through: the layer it
    wraps is listed under the layer's own name, so concepts find their layers whether LoRAs came first or not.
    """
    found: dict[str, nn.Module] = {}
    for prefix, model in components(unet, text_encoder).items():
        wrapped: list[str] = []
        for path, module in model.named_modules():
            if any(path.startswith(w + ".") for w in wrapped):
                continue
            if isinstance(module, BaseTunerLayer):
                module = module.get_base_layer()
                wrapped.append(path)
            if isinstance(module, AdapterLayer):
                wrapped.append(path)
            if path and is_adaptable(module):
                found[f"{prefix}.{path}"] = module
    return found


def find_targets(
    unet: nn.Module | None, text_encoder: nn.Module | None, targets: str
) -> dict[str, nn.Module]:
    """The layers selected by a preset name or comma-separated glob patterns, by qualified name.

    A preset must match something overall; each custom pattern must match at least one layer, so a typo
    fails loudly instead of training nothing.
    """
    candidates = adaptable_layers(unet, text_encoder)
    preset = PRESETS.get(targets.strip())
    patterns = preset or tuple(p.strip() for p in targets.split(",") if p.strip())
    selected: dict[str, nn.Module] = {}
    for pattern in patterns:
        matched = {name: m for name, m in candidates.items() if fnmatchcase(name, pattern)}
        if not matched and preset is None:
            raise SpectralDiffusionError(
                f"target pattern {pattern!r} matches no Linear or Conv2d layer "
                "(names look like unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k)"
            )
        selected.update(matched)
    if not selected:
        raise SpectralDiffusionError(
            f"targets {targets!r} match no layer of the given models; presets: {', '.join(PRESETS)}"
        )
    return dict(sorted(selected.items()))
