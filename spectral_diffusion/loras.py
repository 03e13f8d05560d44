"""Ordinary LoRAs (PEFT, kohya and LoCon files, as diffusers' `load_lora_weights` reads them) beside live concepts.

`set_loras(pipe, {file: weight})` loads each file with diffusers, fuses it into the base weights at its weight
(`set_adapters` + `fuse_lora`) and unloads PEFT's layers, so live concepts (`Composer`) and LoRAs can be set in
either order: the concepts' `AdapterLayer` wrappers are lifted off while diffusers works and put back on the fused
layers, and their merged weight is rebuilt from the new base weight on the next step. The original weights of the
layers a LoRA touched are kept, so every call starts again from the untouched base: the same LoRA set and weights
give the same weights whatever the calls before. Concept files are still checked against the untouched base's
fingerprint (`pristine_fingerprint`). Once no LoRA is left the originals are let go: the weights are the base
again, and whoever changes them next (`pipeline.fuse_concepts`) changes the base that later LoRAs go onto.

Prompts may name LoRAs A1111's way, `<lora:NAME:WEIGHT>` (`pipeline.prompt_tags`): NAME is a file in a LoRA folder.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError, safe_open
from torch import nn

from spectral_diffusion.adapters.layers import AdapterLayer
from spectral_diffusion.errors import SpectralDiffusionError, check_number
from spectral_diffusion.fingerprint import base_fingerprint

# As concepts' weights (compose.MAX_WEIGHT): larger ones only saturate the image.
MAX_LORA_WEIGHT = 100.0


@dataclass
class _State:
    fingerprint: str  # of the base before any LoRA was fused
    originals: dict[nn.Module, torch.Tensor] = field(default_factory=dict)  # layer -> its untouched weight
    loras: dict[Path, float] = field(default_factory=dict)


_STATES: weakref.WeakKeyDictionary[StableDiffusionPipeline, _State] = weakref.WeakKeyDictionary()


def check_lora(path: str | Path, weight: object = 1.0) -> tuple[Path, float]:
    """(resolved path, weight) of a LoRA file, refused in one line if it is missing, not a safetensors file, holds
    no LoRA tensors, or the weight is not a finite number within +-MAX_LORA_WEIGHT."""
    resolved = Path(path).expanduser().resolve()
    value = check_number(weight, f"the weight of LoRA {Path(path).name}", low=-MAX_LORA_WEIGHT, high=MAX_LORA_WEIGHT)
    if not resolved.is_file():
        raise SpectralDiffusionError(f"LoRA file {path} does not exist")
    try:
        with safe_open(str(resolved), framework="pt") as handle:
            keys = list(handle.keys())
    except (SafetensorError, OSError) as exc:
        raise SpectralDiffusionError(f"cannot read LoRA {path} as a .safetensors file ({exc})") from None
    if not any("lora" in key or "hada_" in key for key in keys):
        raise SpectralDiffusionError(f"{path} holds no LoRA tensors (no PEFT, kohya or LoCon keys)")
    return resolved, value


def parse_lora_arg(text: str) -> tuple[Path, float]:
    """`FILE[:WEIGHT]` (weight 1 when absent) as a checked (path, weight); a FILE whose name holds a colon is
    taken whole when it exists."""
    name, sep, weight = text.rpartition(":")
    if not sep or Path(text).expanduser().is_file():
        return check_lora(text)
    return check_lora(name, parse_weight(weight, text))


def parse_weight(text: str, where: str) -> float:
    """The weight written `text` in `where` (a `FILE:W` argument, a `<lora:NAME:W>` tag), as a float."""
    try:
        return float(text)
    except ValueError:
        raise SpectralDiffusionError(f"cannot read the weight {text!r} in {where!r}") from None


def pristine_fingerprint(pipe: StableDiffusionPipeline) -> str:
    """The base fingerprint of `pipe` as loaded, before `set_loras` fused anything into it."""
    state = _STATES.get(pipe)
    return state.fingerprint if state else base_fingerprint(pipe.unet, pipe.text_encoder)


def fused_loras(pipe: StableDiffusionPipeline) -> dict[Path, float]:
    """The LoRAs `set_loras` fused into `pipe` (resolved path -> weight)."""
    state = _STATES.get(pipe)
    return dict(state.loras) if state else {}


def set_loras(pipe: StableDiffusionPipeline, loras: Mapping[str | Path, float]) -> None:
    """Make exactly `loras` (file -> weight) fused into `pipe`'s weights, with or without live concepts on it.

    Files are checked before the pipeline changes. LoRAs are loaded in path order and fused together, on top of the
    untouched base weights. A pipeline holding diffusers LoRA adapters loaded elsewhere is refused: diffusers unloads
    LoRA layers all at once, so fusing ours would drop them.
    """
    wanted = dict(sorted(check_lora(path, weight) for path, weight in loras.items()))
    state = _STATES.get(pipe)
    if wanted == (state.loras if state else {}):  # nothing to change (no state yet: no fingerprint to compute)
        return
    foreign = sorted({name for adapters in pipe.get_list_adapters().values() for name in adapters})
    if wanted and foreign:
        raise SpectralDiffusionError(
            f"the pipeline holds LoRA adapters loaded outside set_loras ({', '.join(foreign)}), which fusing would "
            "unload; give their files to set_loras instead, or unload them first (pipe.unload_lora_weights)")
    if state is None:
        state = _STATES[pipe] = _State(base_fingerprint(pipe.unet, pipe.text_encoder))
    names = [f"spectral_lora_{i}" for i in range(len(wanted))]
    with _bare_layers(pipe), torch.no_grad():
        try:
            for name, path in zip(names, wanted, strict=True):
                pipe.load_lora_weights(str(path), adapter_name=name)
            for model in (pipe.unet, pipe.text_encoder):
                for module in model.modules():
                    if isinstance(module, BaseTunerLayer):
                        base = module.get_base_layer()
                        state.originals.setdefault(base, base.weight.detach().clone())
            # An in-place copy also bumps each weight's version, which AdapterLayer's merged-weight cache keys on
            # (PEFT fuses through `.data`, which does not).
            for base, original in state.originals.items():
                base.weight.copy_(original)
            state.loras = {}
            if names:
                pipe.set_adapters(names, adapter_weights=list(wanted.values()))
                pipe.fuse_lora(adapter_names=names)
        finally:
            if names:
                pipe.unload_lora_weights()
    state.loras = wanted
    if not wanted:
        state.originals.clear()


@contextmanager
def _bare_layers(pipe: StableDiffusionPipeline) -> Iterator[None]:
    """Inside the block, every `AdapterLayer` of the UNet and text encoder is replaced by its base layer, so the
    originals kept are those of the plain layers whatever concepts come and go; the wrappers are put back after."""
    lifted = [(parent, name, child) for model in (pipe.unet, pipe.text_encoder) for parent in model.modules()
              for name, child in parent.named_children() if isinstance(child, AdapterLayer)]
    for parent, name, wrapper in lifted:
        setattr(parent, name, wrapper.base)
    try:
        yield
    finally:
        for parent, name, wrapper in lifted:
            setattr(parent, name, wrapper)
