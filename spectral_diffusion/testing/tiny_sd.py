"""A tiny, randomly initialised SD-1.5-shaped pipeline, so loading, training and export code runs in tests offline.

Same component classes and layout as SD 1.5 (cross-attention UNet with 1x1-conv `proj_in`/`proj_out`, GEGLU
feed-forward, KL VAE, CLIP text encoder, SD 1.5's PNDM scheduler config), only narrow: every layer that a target
preset can adapt has min(out, in) >= 32, so bands 0..7 of rank 4 fit.

    python -m spectral_diffusion.testing.tiny_sd OUT_DIR [--single-file] [--seed 0]

`random_concept(pipe, ...)` makes a concept file's worth of random, nonzero adapter state for such a pipeline,
for tests of everything downstream of training (files, fusion, composition, export).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from spectral_diffusion.adapters.config import SPECTRAL_VARIANTS
from spectral_diffusion.adapters.inject import conv_kernels
from spectral_diffusion.adapters.layers import adapter_type, unwrap
from spectral_diffusion.adapters.targets import find_targets
from spectral_diffusion.bands import weight_matrix
from spectral_diffusion.concept_file import Concept, ConceptMeta
from spectral_diffusion.fingerprint import base_fingerprint
from spectral_diffusion.models import SD15_CONFIG_DIR
from spectral_diffusion.single_file import save_single_file
from spectral_diffusion.tokenizer import build_clip_tokenizer
from spectral_diffusion.tokens import token_names

# The single file that `save_tiny_model(..., single_file=True)` writes inside the model folder.
SINGLE_FILE_NAME = "tiny_sd.safetensors"

WORDS = (
    "a", "an", "the", "photo", "picture", "of", "in", "on", "with", "and", "at", "beach", "forest", "city", "snow",
    "cat", "dog", "toy", "person", "man", "woman", "red", "blue", "green", "small", "big", "sks", "style",
    "sitting", "standing", "left", "right",
)  # fmt: skip


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A fresh tiny pipeline with weights drawn from `seed` (the global RNG state is left untouched)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_clip_tokenizer(WORDS, tmp)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            layers_per_block=1,
            sample_size=16,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=tokenizer.model_max_length,
                projection_dim=32,
                hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = PNDMScheduler.from_pretrained(SD15_CONFIG_DIR, subfolder="scheduler")
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_model(out_dir: str | Path, single_file: bool = False, seed: int = 0) -> Path:
    """Save the tiny pipeline as a diffusers folder (and `SINGLE_FILE_NAME` inside it, in SD 1.x LDM layout)."""
    out = Path(out_dir)
    pipe = build_tiny_pipeline(seed)
    pipe.save_pretrained(out)
    if single_file:
        save_single_file(pipe, out / SINGLE_FILE_NAME)
    return out


def random_concept(
    pipe: StableDiffusionPipeline,
    *,
    variant: str = "additive",
    rank: int = 4,
    band: int = 0,
    targets: str = "attn",
    token: str = "<tok>",
    n_vectors: int = 2,
    seed: int = 0,
) -> Concept:
    """A concept for `pipe` with random nonzero state (no SVD, no training): orthonormal band slices, positive
    singular values, small random trainables, random token vectors. Deterministic in `seed`."""
    gen = torch.Generator().manual_seed(seed)
    cls = adapter_type(variant)
    layers = {}
    bases: dict[int, torch.Tensor] = {}
    for name, module in find_targets(pipe.unet, pipe.text_encoder, targets).items():
        out_features, in_features = weight_matrix(unwrap(module)).shape
        sizes = {"out": out_features, "in": in_features, "r": rank, "pairs": rank * (rank - 1) // 2}
        state = {
            key: 0.1 * torch.randn([sizes[d] for d in dims], generator=gen)
            for key, dims in cls.layout.items()
        }
        for key in (
            "U",
            "V",
            "down",
        ):  # orthonormal columns (rows for `down`), like an SVD band / ortho basis
            if key in state:
                n = sizes["out" if key == "U" else "in"]
                if n not in bases:  # one QR per size (QR is slow on a loaded CPU); layers pick random columns
                    bases[n] = torch.linalg.qr(torch.randn(n, n, generator=gen)).Q
                q = bases[n][:, torch.randperm(n, generator=gen)[:rank]]
                state[key] = q.mT.contiguous() if key == "down" else q.contiguous()
        if "S" in state:
            state["S"] = torch.rand(rank, generator=gen) + 0.5
        layers[name] = state
    dim = pipe.text_encoder.get_input_embeddings().embedding_dim
    meta = ConceptMeta(
        variant=variant,
        rank=rank,
        band=band if variant in SPECTRAL_VARIANTS else None,
        targets=targets,
        base_fingerprint=base_fingerprint(pipe.unet, pipe.text_encoder),
        token=token,
        token_names=token_names(token, n_vectors),
        class_word="dog",
        kernels=conv_kernels(pipe.unet, pipe.text_encoder, layers),
        training={"steps": 0, "seed": seed},
    )
    return Concept(meta, layers, 0.3 * torch.randn(n_vectors, dim, generator=gen))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m spectral_diffusion.testing.tiny_sd", description=__doc__.split("\n")[0]
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--single-file", action="store_true", help=f"also write {SINGLE_FILE_NAME} (SD 1.x LDM keys)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = save_tiny_model(args.out_dir, single_file=args.single_file, seed=args.seed)
    print(out)


if __name__ == "__main__":
    main()
