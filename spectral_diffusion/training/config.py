"""The settings of a training run (`TrainConfig`), their defaults and the checks that run before anything loads."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spectral_diffusion.adapters import AdapterConfig
from spectral_diffusion.atomic import check_writable
from spectral_diffusion.concept_file import canonical_token
from spectral_diffusion.errors import SpectralDiffusionError, check_number
from spectral_diffusion.models import DTYPES
from spectral_diffusion.training.checkpoint import checkpoint_dir

log = logging.getLogger(__name__)
MIXED_PRECISIONS = ("no", "fp16", "bf16")
# (UNet, text encoder) learning rates when not given. Mix-of-Show's 1e-4 / 1e-5 for the LoRA-style baselines; the
# spectral variants move unit-norm singular vectors (and rotation angles), whose useful steps are larger: 10x,
# between the 1e-4 and 1e-2 UNet rates of the Spectral Adapter paper's two Mix-of-Show configurations.
DEFAULT_LRS = {"additive": (1e-3, 1e-4), "rotational": (1e-3, 1e-4), "lora": (1e-4, 1e-5), "ortho": (1e-4, 1e-5)}


def sidecar_path(out: str | Path) -> Path:
    """`dogA.safetensors` -> `dogA.json`: what the app lists without opening the concept file (docs/training.md)."""
    return Path(out).with_suffix(".json")


def preview_path(out: str | Path) -> Path:
    """`dogA.safetensors` -> `dogA.preview.png`."""
    out = Path(out)
    return out.with_name(out.stem + ".preview.png")


def loss_log_path(out: str | Path) -> Path:
    """`dogA.safetensors` -> `dogA.loss.csv`: step, loss, learning rate and seconds per step, one row per step."""
    out = Path(out)
    return out.with_name(out.stem + ".loss.csv")


@dataclass
class TrainConfig:
    """Everything a training run depends on; `None` defaults are resolved from the model or the variant."""

    photo_dir: str | Path
    token: str
    out: str | Path
    class_word: str = ""
    # base model (see models.load_base)
    base: str = "toy"
    base_config: str | None = None
    allow_pickle: bool = False
    device: str | None = None
    dtype: str | None = None  # weights: fp32/fp16/bf16; None: from mixed_precision
    # adapter
    variant: str = "additive"
    band: int | str = "auto"
    rank: int = 8
    targets: str = "attn"
    train_singular_values: bool = True
    # optimisation
    steps: int = 1000
    batch_size: int = 2
    grad_accum: int = 1
    resolution: int | None = None  # None: the model's native size
    lr_unet: float | None = None  # None: DEFAULT_LRS[variant]
    lr_text: float | None = None
    lr_emb: float = 1e-3
    warmup_steps: int | None = None  # None: 5% of steps
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    noise_offset: float = 0.01
    snr_gamma: float = 0.0  # 0: off
    # interference control: weight of the text-side locality term (trainer.locality_loss); 0: off
    locality_weight: float = 0.0
    # tokens
    num_vectors: int = 2
    emb_norm_cap: float | None = None  # None: 1.4x the vocabulary's mean row norm; 0: off
    # data
    prior_dir: str | Path | None = None
    prior_weight: float = 1.0
    mask_floor: float = 0.0
    flip: bool = True
    # bookkeeping
    checkpoint_every: int = 250  # 0: only on Ctrl-C
    resume: bool = False
    validation_prompts: Sequence[str] = field(default_factory=tuple)
    validate_every: int = 0
    sample_steps: int = 25
    preview_images: int = 4
    concepts_dir: str | Path | None = None
    overwrite: bool = False

    def check(self) -> None:
        """Refuse bad settings before anything slow happens (including an existing `out` without `overwrite`), and
        spell the token as it is stored (lower case: the trigger word that works here, in diffusers and in A1111)."""
        if self.token != canonical_token(self.token):
            log.info("trigger word %s: concept tokens are stored lower-case (prompts may spell them either way)",
                     canonical_token(self.token))
            self.token = canonical_token(self.token)
        out = Path(self.out)
        if out.suffix != ".safetensors":
            raise SpectralDiffusionError(f"--out {out} must end in .safetensors")
        if out.exists() and not self.overwrite:
            raise SpectralDiffusionError(f"{out} already exists; pass --overwrite to replace it")
        # An interrupted run's loss log is part of its checkpoints, which the trainer asks to resume or overwrite.
        interrupted = checkpoint_dir(out).exists()
        for beside in (sidecar_path(out), preview_path(out), *([] if interrupted else [loss_log_path(out)])):
            if beside.exists() and not self.overwrite and not self.resume:
                raise SpectralDiffusionError(
                    f"{beside} already exists (the trainer writes it beside {out.name}); pass --overwrite to replace it")
        folders = {"photo folder": self.photo_dir, "--prior-dir": self.prior_dir, "--concepts-dir": self.concepts_dir}
        for what, folder in folders.items():
            if folder is not None and not Path(folder).is_dir():
                raise SpectralDiffusionError(f"{what} {folder} does not exist or is not a folder")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise SpectralDiffusionError(
                f"--mixed-precision must be one of {', '.join(MIXED_PRECISIONS)}, got {self.mixed_precision!r}")
        if not (self.band == "auto" or (isinstance(self.band, int) and self.band >= 0)):
            raise SpectralDiffusionError(f"--band must be 'auto' or a non-negative integer, got {self.band!r}")
        self.adapter_config(0)  # validates variant, rank, targets
        positive = {"steps": self.steps, "batch-size": self.batch_size, "grad-accum": self.grad_accum,
                    "num-vectors": self.num_vectors, "sample-steps": self.sample_steps}
        non_negative = {"lr-unet": self.lr_unet or 0, "lr-text": self.lr_text or 0, "lr-emb": self.lr_emb,
                        "warmup-steps": self.warmup_steps or 0, "weight-decay": self.weight_decay,
                        "prior-weight": self.prior_weight, "noise-offset": self.noise_offset,
                        "snr-gamma": self.snr_gamma, "locality-weight": self.locality_weight,
                        "emb-norm-cap": self.emb_norm_cap or 0,
                        "checkpoint-every": self.checkpoint_every, "validate-every": self.validate_every,
                        "preview-images": self.preview_images, "max-grad-norm": self.max_grad_norm}
        for name, value in positive.items():
            if value < 1:
                raise SpectralDiffusionError(f"--{name} must be at least 1, got {value}")
        for name, value in non_negative.items():
            check_number(value, f"--{name}", low=0)
        if not 0 <= self.mask_floor <= 1:
            raise SpectralDiffusionError(f"--mask-floor must be between 0 and 1, got {self.mask_floor}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise SpectralDiffusionError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.resolution is not None and self.resolution < 8:
            raise SpectralDiffusionError(f"--resolution must be at least 8, got {self.resolution}")
        check_writable(out.parent)

    def adapter_config(self, band: int) -> AdapterConfig:
        return AdapterConfig(variant=self.variant, rank=self.rank, band=band, targets=self.targets,
                             train_singular_values=self.train_singular_values, seed=self.seed)

    def learning_rates(self) -> tuple[float, float, float]:
        """(UNet, text encoder, embeddings), with the variant's defaults filled in."""
        unet, text = DEFAULT_LRS[self.variant]
        return (unet if self.lr_unet is None else self.lr_unet,
                text if self.lr_text is None else self.lr_text, self.lr_emb)
