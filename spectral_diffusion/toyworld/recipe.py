"""The toy world's concept recipe, in one place: how the demo, the fusion benchmark, `pipelines/` and README train
a concept on the bundled base, and how they fuse concepts.

Found by measurement (`benchmarks/concept_recipe.py`, docs/toyworld.md "Training the concepts"): identity lives in
the text pathway (the token rows, the text encoder's attention, the cross-attention keys and values), so a fused
concept acts only where its own token is, and the closed-form text-side merge keeps every concept's mapping of its
own token (`spectral_diffusion.fusion`).

API:
    RECIPE: Recipe                         # targets, rank, steps, learning rates per adapter kind, fusion method
    RECIPE.train_config(name, photo_dir, out, *, band, variant, seed, ...) -> TrainConfig
    RECIPE.training_defaults() -> dict       # the bundled base's training_defaults.json (the app's Train tab)
    RECIPE.cli_flags(variant) -> list[str]  # the same settings as `spectral-diffusion train` flags
    ordinary_captions(n, seed) -> list[str]  # closed-form fusion's prior: captions of ordinary scenes
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.models import BaseSpec
from spectral_diffusion.toyworld import concepts, render
from spectral_diffusion.toyworld.scoring import concept_token
from spectral_diffusion.training.checkpoint import checkpoint_dir
from spectral_diffusion.training.config import TrainConfig


@dataclass(frozen=True)
class Recipe:
    """Training settings of a toy concept (the rest are `TrainConfig`'s defaults) and the fusion method to use."""

    targets: str = "kv"
    rank: int = 4
    steps: int = 800
    batch_size: int = 4
    # (UNet, text encoder) learning rates per adapter kind; every kind trains the token rows at `lr_emb`
    lrs: dict[str, tuple[float, float]] = field(default_factory=lambda: {
        "additive": (3e-3, 1e-3), "rotational": (3e-3, 1e-3), "lora": (3e-3, 3e-4), "ortho": (1e-2, 1e-3)})
    lr_emb: float = 5e-3
    num_vectors: int = 2
    locality_weight: float = 1.0
    fusion: str = "closed-form"
    prior_weight: float = 1.0  # closed-form fusion: weight of the ordinary captions (`ordinary_captions`)
    prior_captions: int = 64

    def settings(self, variant: str = "additive") -> dict[str, object]:
        """The recipe's `TrainConfig` fields for an adapter kind (one source for `train_config` and `cli_flags`)."""
        if variant not in self.lrs:
            raise SpectralDiffusionError(f"unknown adapter variant {variant!r}; choose one of {', '.join(self.lrs)}")
        lr_unet, lr_text = self.lrs[variant]
        return dict(variant=variant, rank=self.rank, targets=self.targets, steps=self.steps,
                    batch_size=self.batch_size, lr_unet=lr_unet, lr_text=lr_text, lr_emb=self.lr_emb,
                    num_vectors=self.num_vectors, locality_weight=self.locality_weight)

    def training_defaults(self) -> dict[str, object]:
        """What the bundled base's `training_defaults.json` holds (`models.training_defaults`; the app trains with
        it): the additive recipe, without flips."""
        return {**self.settings("additive"), "flip": False}

    def train_config(self, name: str, photo_dir: str | Path, out: str | Path, *, band: int | str = 0,
                     variant: str = "additive", base: str = "toy", device: str | None = None, seed: int = 0,
                     overwrite: bool = False, **changes: object) -> TrainConfig:
        """Concept `name` trained by this recipe: no flips (the concepts are not mirror-symmetric), no checkpoints
        on schedule and no preview (the caller samples); an interrupted run resumes from its Ctrl-C checkpoint.
        `changes` override TrainConfig fields (a sweep's row)."""
        settings = {**self.settings(variant), "band": band, **changes}
        return TrainConfig(
            photo_dir=photo_dir, token=concept_token(name), out=out, class_word=concepts.get_concept(name).class_word,
            base=BaseSpec(base, device=device), seed=seed, flip=False, checkpoint_every=0, preview_images=0,
            resume=checkpoint_dir(Path(out)).is_dir() and not overwrite, overwrite=overwrite, **settings)

    def fuse_options(self, method: str | None = None) -> dict[str, object]:
        """Keyword arguments of `fusion.fuse` for `method` (default: the recipe's): closed-form fusion gets the
        world's ordinary captions as its prior."""
        method = method or self.fusion
        if method != "closed-form":
            return {"method": method}
        return {"method": method, "prior_weight": self.prior_weight,
                "prior_prompts": ordinary_captions(self.prior_captions)}

    def cli_flags(self, variant: str = "additive") -> list[str]:
        """The recipe as `spectral-diffusion train` flags (README and `pipelines/` print these)."""
        flags = []
        for key, value in self.settings(variant).items():
            flags += [f"--{key.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else str(value)]
        return [*flags, "--no-flip"]


def ordinary_captions(n: int = 64, seed: int = 0) -> list[str]:
    """Captions of `n` seeded ordinary scenes of the world (never a held-out concept): what closed-form fusion keeps
    mapped as the base does, as Custom Diffusion regularises its merge with real captions."""
    rng = random.Random(seed)
    return [render.caption(render.sample_spec(rng)) for _ in range(n)]


RECIPE = Recipe()
