"""File sizes: a concept file vs a PEFT LoRA of the same rank on the same SD 1.5 targets, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sizes.py

For `attn` and `attn+ff` at rank 4 and 8: an additive concept file (`save_concept`: fp32 U, S, V, A, B, c per layer,
two token vectors of 768, JSON metadata) against PEFT's own LoRA of that rank on the same UNet and text-encoder layers
(`get_peft_model` + `get_peft_model_state_dict`, saved with safetensors, fp32), with and without the token's
textual-inversion embedding that a LoRA needs beside it. Tensor values do not change the sizes; shapes are SD 1.5's.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file

from spectral_diffusion.adapters.layers import AdditiveAdapter, unwrap
from spectral_diffusion.adapters.targets import find_targets
from spectral_diffusion.bands import weight_matrix
from spectral_diffusion.concept_file import Concept, ConceptMeta, save_concept
from spectral_diffusion.testing.sd15 import sd15_pipeline

N_VECTORS = 2


def concept_size(pipe, targets: str, rank: int, folder: Path) -> int:
    layers = {}
    for name, module in find_targets(pipe.unet, pipe.text_encoder, targets).items():
        out_f, in_f = weight_matrix(unwrap(module)).shape
        sizes = {"out": out_f, "in": in_f, "r": rank}
        layers[name] = {key: torch.zeros([sizes[d] for d in dims]) for key, dims in AdditiveAdapter.layout.items()}
    meta = ConceptMeta(variant="additive", rank=rank, band=0, targets=targets, base_fingerprint="0" * 16,
                       token="<c>", token_names=["<c>", "<c>_1"], class_word="dog")
    path = save_concept(folder / f"concept-{targets}-{rank}.safetensors",
                        Concept(meta, layers, torch.zeros(N_VECTORS, pipe.text_encoder.config.hidden_size)))
    return path.stat().st_size


def lora_size(pipe, targets: str, rank: int, folder: Path) -> int:
    total = 0
    found = find_targets(pipe.unet, pipe.text_encoder, targets)
    for prefix, model in (("unet.", pipe.unet), ("text_encoder.", pipe.text_encoder)):
        names = [name.removeprefix(prefix) for name in found if name.startswith(prefix)]
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=rank, target_modules=names))
        path = folder / f"lora-{prefix}{targets}-{rank}.safetensors"
        save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}, path)
        total += path.stat().st_size
    return total


def main() -> None:
    torch.set_num_threads(1)
    pipe = sd15_pipeline()
    folder = Path(tempfile.mkdtemp(prefix="bench-sizes-"))
    embedding = folder / "embedding.safetensors"
    save_file({"emb_params": torch.zeros(N_VECTORS, pipe.text_encoder.config.hidden_size)}, embedding)
    ti = embedding.stat().st_size
    print("| targets | rank | concept file MB | PEFT LoRA MB | + TI embedding MB | concept / LoRA | "
          "concept / (LoRA + TI) |\n|---|---|---|---|---|---|---|")
    for targets in ("attn", "attn+ff"):
        for rank in (4, 8):
            concept, lora = concept_size(pipe, targets, rank, folder), lora_size(pipe, targets, rank, folder)
            print(f"| {targets} | {rank} | {concept / 1e6:.2f} | {lora / 1e6:.2f} | {(lora + ti) / 1e6:.2f} | "
                  f"{concept / lora:.2f}x | {concept / (lora + ti):.2f}x |", flush=True)


if __name__ == "__main__":
    main()
