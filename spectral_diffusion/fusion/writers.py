"""Writing a fused pipeline: a diffusers folder, an SD 1.x single file or one LoRA, each with `fusion.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from spectral_diffusion.adapters.inject import conv_kernels
from spectral_diffusion.atomic import atomic_directory, check_writable
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.export import embedding_file_name, lora_tensors, write_textual_inversion
from spectral_diffusion.fusion.fusing import FusionReport
from spectral_diffusion.fusion.methods import LOW_RANK_METHODS
from spectral_diffusion.single_file import CLIP_PREFIX, pipeline_to_ldm
from spectral_diffusion.tokens import token_ids

OUTPUT_FORMATS = ("diffusers", "single-file", "lora")
FUSION_JSON = "fusion.json"


def check_format(fmt: str, method: str, exact_factors: bool | None = None) -> None:
    """Refuse an unknown output format, or a LoRA of a fusion whose result is not an exact sum of factors (by
    default: judged from the method, so the CLI can ask before fusing)."""
    if fmt not in OUTPUT_FORMATS:
        raise SpectralDiffusionError(f"unknown output format {fmt!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    if fmt == "lora" and not (method in LOW_RANK_METHODS if exact_factors is None else exact_factors):
        raise SpectralDiffusionError(
            f"--format lora needs a method whose result is an exact sum of factors ({', '.join(LOW_RANK_METHODS)}); "
            f"{method} gives dense weight changes: write diffusers or single-file, or pass --method spectral")


def save_fused(pipe: StableDiffusionPipeline, report: FusionReport, out: str | Path, fmt: str = "diffusers", *,
               lora_format: str = "peft", overwrite: bool = False) -> list[Path]:
    """Write the fused model into the folder `out` (atomically: a temp folder renamed into place); return the
    main files written.

    - `diffusers`: a pipeline folder (`StableDiffusionPipeline.from_pretrained` loads it, tokens included);
    - `single-file`: `<out name>.safetensors`, an SD 1.x LDM checkpoint; an LDM file has no place for new tokens,
      so each concept's embedding goes beside it in `embeddings/` (textual-inversion files, as A1111 reads them);
    - `lora`: `<out name>.safetensors`, one LoRA holding the exact merged delta (low-rank methods only), plus
      `embeddings/`.
    Every format also writes `fusion.json` (concepts, tokens, bands, fingerprints, weights, method).
    """
    out = Path(out)
    check_format(fmt, report.method, report.low_rank is not None)
    check_output(out, overwrite)
    with atomic_directory(out) as tmp:
        written = _write(pipe, report, tmp, fmt, out.name, lora_format)
        (tmp / FUSION_JSON).write_text(json.dumps({**report.to_dict(), "output_format": fmt}, indent=2) + "\n")
    return [out / p.relative_to(tmp) for p in written]


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing output unless `overwrite` (checked before the slow work, and again when writing)."""
    if out.exists() and not overwrite:
        raise SpectralDiffusionError(f"{out} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise SpectralDiffusionError(f"{out} exists and is not a folder; fused models are written as folders")
    check_writable(out.parent)


def _write(pipe: StableDiffusionPipeline, report: FusionReport, folder: Path, fmt: str, name: str,
           lora_format: str) -> list[Path]:
    if fmt == "diffusers":
        pipe.save_pretrained(folder)
        return [folder / "model_index.json"]
    main = folder / f"{name}.safetensors"
    if fmt == "single-file":
        save_file(_ldm_without_new_tokens(pipe, report), main, metadata={"format": "pt"})
    else:
        kernels = conv_kernels(pipe.unet, pipe.text_encoder, report.low_rank)
        tensors = lora_tensors(report.low_rank, lora_format, kernels)
        meta = {"method": report.method, "base_fingerprint": report.base_fingerprint,
                "concepts": [c.token for c in report.concepts], "weights": report.weights}
        save_file(tensors, main, metadata={"format": "pt", "spectral_diffusion_fusion": json.dumps(meta)})
    return [main, *_write_embeddings(pipe, report, folder / "embeddings")]


def _ldm_without_new_tokens(pipe: StableDiffusionPipeline, report: FusionReport) -> dict[str, torch.Tensor]:
    """The fused pipeline as an SD 1.x LDM state dict, with the token-embedding matrix cut back to the base
    vocabulary: A1111 / ComfyUI build the text encoder at the base size and refuse extra rows."""
    state = pipeline_to_ldm(pipe)
    key = CLIP_PREFIX + "embeddings.token_embedding.weight"
    ids = sorted(token_ids(pipe.tokenizer, [n for c in report.concepts for n in c.token_names]))
    if ids != list(range(ids[0], state[key].shape[0])):
        raise RuntimeError(f"concept tokens are not the last rows of the embedding matrix: {ids}")
    state[key] = state[key][: ids[0]].clone()
    return state


def _write_embeddings(pipe: StableDiffusionPipeline, report: FusionReport, folder: Path) -> list[Path]:
    """One textual-inversion file per concept, `{token: [n_vectors, dim]}` as export.py writes them, named after
    the token (`<doga>.safetensors`: A1111 and ComfyUI use the file name as the trigger word)."""
    folder.mkdir()
    weight = pipe.text_encoder.get_input_embeddings().weight.detach()
    paths = []
    for concept in report.concepts:
        rows = weight[token_ids(pipe.tokenizer, concept.token_names)]
        paths.append(write_textual_inversion(folder / embedding_file_name(concept.token), concept.token, rows))
    return paths


def read_fusion_json(model_dir: str | Path) -> dict[str, Any] | None:
    """The `fusion.json` of a fused model folder, or None for a model that is not a fusion result."""
    path = Path(model_dir) / FUSION_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SpectralDiffusionError(f"{path}: not valid JSON ({exc})") from exc
