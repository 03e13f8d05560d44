"""Export a concept as a plain LoRA (diffusers/PEFT or kohya keys) plus a textual-inversion embedding.

Every adapter variant's weight change is exactly `dW = up @ down` (rank 2r for additive, r for rotational), so the
export is lossless: `lora_B = up`, `lora_A = down`, at scale 1. PEFT-format files carry no alphas (diffusers then
uses alpha = rank, scale 1); kohya files carry `alpha = rank` for the same scale in A1111 / ComfyUI.

Convolutions (SD 1.x's 1x1 `proj_in` / `proj_out`, and the 3x3 resnet convs of `attn+ff+conv` concepts) are
written as conv kernels `down [k, in, kh, kw]` and `up [out, k, 1, 1]`, the layout PEFT and kohya (LoCon) use; the
kernel sizes come from the concept file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from spectral_diffusion.adapters.layers import Factors
from spectral_diffusion.atomic import atomic_write, check_writable
from spectral_diffusion.concept_file import Concept, canonical_token, load_concept
from spectral_diffusion.errors import SpectralDiffusionError

FORMATS = ("peft", "kohya")
_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def _external_path(layer: str) -> tuple[str, str]:
    """`(component, module path)` in the layout LoRA files use: CLIP keeps its `text_model.` level there,
    which transformers >= 5.6 dropped from `CLIPTextModel`'s own module names."""
    component, _, path = layer.partition(".")
    if component not in _KOHYA_PREFIX:
        raise SpectralDiffusionError(f"cannot export layer {layer!r}: not in the UNet or text encoder")
    if component == "text_encoder" and not path.startswith("text_model."):
        path = "text_model." + path
    return component, path


def lora_state_dict(concept: Concept, fmt: str = "peft") -> dict[str, torch.Tensor]:
    """The concept's exact weight changes as LoRA tensors (fp32) in format `fmt` (`peft` or `kohya`)."""
    return lora_tensors({layer: concept.delta_factors(layer) for layer in concept.layers}, fmt, concept.meta.kernels)


def lora_tensors(factors: Mapping[str, Factors], fmt: str = "peft",
                 kernels: Mapping[str, Sequence[int]] | None = None) -> dict[str, torch.Tensor]:
    """LoRA tensors in format `fmt` for per-layer factors `{layer name: (up [out, k], down [k, in*kh*kw])}`;
    layers in `kernels` (`[kh, kw]`) are convolutions."""
    kernels = kernels or {}
    if fmt not in FORMATS:
        raise SpectralDiffusionError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out: dict[str, torch.Tensor] = {}
    for layer in sorted(factors):
        up, down = (t.detach().to("cpu", torch.float32) for t in factors[layer])
        if layer in kernels:
            up, down = up[:, :, None, None], down.reshape(down.shape[0], -1, *kernels[layer])
        component, path = _external_path(layer)
        if fmt == "peft":
            out[f"{component}.{path}.lora_A.weight"] = down.contiguous()
            out[f"{component}.{path}.lora_B.weight"] = up.contiguous()
        else:
            name = _KOHYA_PREFIX[component] + path.replace(".", "_")
            out[f"{name}.lora_down.weight"] = down.contiguous()
            out[f"{name}.lora_up.weight"] = up.contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    return out


def embedding_file_name(token: str) -> str:
    """`<doga>` -> `<doga>.safetensors`: A1111 and ComfyUI take an embedding's file name as its trigger word."""
    token = canonical_token(token)
    if not token or any(c in token for c in "/\\\0") or token in (".", ".."):
        raise SpectralDiffusionError(f"token {token!r} cannot name an embedding file")
    return f"{token}.safetensors"


def textual_inversion_path(lora_path: str | Path, token: str) -> Path:
    """Where a LoRA's token embedding goes: beside it, named after the token (`embedding_file_name`)."""
    return Path(lora_path).with_name(embedding_file_name(token))


@dataclass(frozen=True)
class Exported:
    """What `export_lora` wrote, and the token to write in prompts where the embedding is loaded."""

    lora: Path
    embedding: Path
    token: str


def export_lora(
    concept: Concept | str | Path, out: str | Path, fmt: str = "peft", *, overwrite: bool = False
) -> Exported:
    """Write the LoRA to `out` and the token embedding next to it (`textual_inversion_path`).

    The embedding file `<token>.safetensors` holds one tensor `{token: [n_vectors, dim]}`, the single-key layout
    that diffusers' `load_textual_inversion`, A1111 and ComfyUI all read; its key and file name are the concept's
    trigger word (`canonical_token`), the spelling that works verbatim in all three.
    """
    if not isinstance(concept, Concept):
        concept = load_concept(concept)
    out = Path(out)
    ti_out = textual_inversion_path(out, concept.meta.token)
    if out.suffix != ".safetensors":
        raise SpectralDiffusionError(f"{out}: LoRA files are written as .safetensors")
    for path in (out, ti_out):
        if path.exists() and not overwrite:
            raise SpectralDiffusionError(f"{path} already exists (pass --overwrite to replace it)")
    check_writable(out.parent)
    tensors = lora_state_dict(concept, fmt)
    meta = concept.meta
    source = {"token": meta.token, "variant": meta.variant, "rank": meta.rank, "band": meta.band,
              "base_fingerprint": meta.base_fingerprint, "format": fmt}  # fmt: skip
    metadata = {"format": "pt", "spectral_diffusion_export": json.dumps(source, sort_keys=True)}
    atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    write_textual_inversion(ti_out, meta.token, concept.token_embeddings)
    return Exported(out, ti_out, canonical_token(meta.token))


def write_textual_inversion(path: str | Path, token: str, rows: torch.Tensor) -> Path:
    """Write `{token: [n_vectors, dim]}` (fp32, token in its canonical spelling: see `export_lora`), atomically."""
    embedding = {canonical_token(token): rows.detach().to("cpu", torch.float32).contiguous()}
    return atomic_write(path, lambda tmp: save_file(embedding, tmp, metadata={"format": "pt"}))
