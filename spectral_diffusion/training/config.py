"""The settings of a training run (`TrainConfig`), their defaults and the checks that run before anything loads."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from spectral_diffusion.adapters import AdapterConfig
from spectral_diffusion.atomic import check_writable
from spectral_diffusion.concept_file import canonical_token
from spectral_diffusion.errors import SpectralDiffusionError, check_number
from spectral_diffusion.models import BaseSpec, training_defaults
from spectral_diffusion.prompts import read_prompts
from spectral_diffusion.sidecar import sidecar_path
from spectral_diffusion.training.checkpoint import checkpoint_dir

log = logging.getLogger(__name__)
MIXED_PRECISIONS = ("no", "fp16", "bf16")
# (UNet, text encoder) learning rates when not given. Mix-of-Show's 1e-4 / 1e-5 for the LoRA-style baselines; the
# spectral variants move unit-norm singular vectors (and rotation angles), whose useful steps are larger: 10x,
# between the 1e-4 and 1e-2 UNet rates of the Spectral Adapter paper's two Mix-of-Show configurations.
DEFAULT_LRS = {"additive": (1e-3, 1e-4), "rotational": (1e-3, 1e-4), "lora": (1e-4, 1e-5), "ortho": (1e-4, 1e-5)}


def preview_path(out: str | Path) -> Path:
    """`dogA.safetensors` -> `dogA.preview.png`."""
    out = Path(out)
    return out.with_name(out.stem + ".preview.png")


def loss_log_path(out: str | Path) -> Path:
    """`dogA.safetensors` -> `dogA.loss.csv`: step, loss, learning rate and seconds per step, one row per step."""
    out = Path(out)
    return out.with_name(out.stem + ".loss.csv")


def _lr_help(which: int) -> str:
    """`DEFAULT_LRS` as help text: '0.001 additive/rotational, 0.0001 lora/ortho' for the UNet (`which` 0)."""
    variants: dict[float, list[str]] = {}
    for variant, rates in DEFAULT_LRS.items():
        variants.setdefault(rates[which], []).append(variant)
    return ", ".join(f"{rate:g} {'/'.join(names)}" for rate, names in variants.items())


# The argument groups of `spectral-diffusion train --help`.
_ADAPTER, _OPTIMISATION, _TOKEN, _DATA, _BOOKKEEPING = "adapter", "optimisation", "token", "data", "checkpoints and samples"


@dataclass
class TrainConfig:
    """Everything a training run depends on; `None` defaults are resolved from the model or the variant.

    Each field's metadata is its `spectral-diffusion train` flag (`cli/options.py`); `base` is the model trained on
    (`BaseSpec`: the flags every command shares, the device among them), given as a spec or as its `spec` string.
    The base's `dtype` None means the weights' precision follows `mixed_precision`.
    """

    photo_dir: str | Path = field(metadata={
        "help": "folder of photos of the concept", "positional": True, "metavar": "PHOTO_DIR"})
    token: str = field(metadata={"help": 'the new trigger word, e.g. "<dogA>" (must not be a known word)'})
    out: str | Path = field(metadata={"help": "the concept file to write", "metavar": "CONCEPT.safetensors"})
    class_word: str = field(default="", metadata={
        "help": "what the concept is (dog, person, ...): initialises the token embedding and fills {class_word} in "
                "captions", "default_help": "none"})
    base: BaseSpec | str = field(default_factory=BaseSpec)
    variant: str = field(default=AdapterConfig.variant, metadata={
        "group": _ADAPTER, "help": "additive | rotational (Spectral Adapter bands) | lora | ortho (baselines)"})
    band: int | str = field(default="auto", metadata={
        "group": _ADAPTER, "help": "SVD band N (singular vectors N*rank..(N+1)*rank-1), or auto: the lowest band that "
                                  "no concept of this base model in --concepts-dir uses"})
    rank: int = field(default=AdapterConfig.rank, metadata={
        "group": _ADAPTER, "help": "singular vectors per band / LoRA rank"})
    targets: str = field(default=AdapterConfig.targets, metadata={
        "group": _ADAPTER, "help": "kv (cross-attention keys/values + text-encoder attention: the text pathway only) | "
                                  "attn | attn+ff | attn+ff+conv (adds the UNet's 3x3 resnet and sampler convs, "
                                  "LoCon-style) | comma-separated glob patterns on layer names"})
    train_singular_values: bool = field(default=AdapterConfig.train_singular_values, metadata={
        "group": _ADAPTER, "flag": "--no-singular-values", "default_help": "trained",
        "help": "spectral variants: keep the band's singular values frozen"})
    steps: int = field(default=1000, metadata={"group": _OPTIMISATION, "help": "optimizer steps"})
    batch_size: int = field(default=2, metadata={
        "group": _OPTIMISATION, "help": "images per micro-batch and process"})
    grad_accum: int = field(default=1, metadata={"group": _OPTIMISATION, "help": "micro-batches per optimizer step"})
    resolution: int | None = field(default=None, metadata={
        "group": _OPTIMISATION, "help": "training size in px", "default_help": "the model's native size, 512 for SD 1.5"})
    lr_unet: float | None = field(default=None, metadata={
        "group": _OPTIMISATION, "help": "UNet adapter learning rate", "default_help": _lr_help(0)})
    lr_text: float | None = field(default=None, metadata={
        "group": _OPTIMISATION, "help": "text-encoder adapter learning rate; 0 freezes it",
        "default_help": _lr_help(1)})
    lr_emb: float = field(default=1e-3, metadata={
        "group": _OPTIMISATION, "help": "new token embeddings learning rate; 0 freezes them"})
    warmup_steps: int | None = field(default=None, metadata={
        "group": _OPTIMISATION, "help": "linear warm-up before the cosine decay", "default_help": "5% of --steps"})
    weight_decay: float = field(default=1e-2, metadata={
        "group": _OPTIMISATION, "help": "AdamW weight decay of adapters"})
    max_grad_norm: float = field(default=1.0, metadata={
        "group": _OPTIMISATION, "help": "gradient clipping; 0 turns it off"})
    seed: int = field(default=0, metadata={"group": _OPTIMISATION, "help": "seed of everything random"})
    mixed_precision: str = field(default="no", metadata={
        "group": _OPTIMISATION, "help": f"{' | '.join(MIXED_PRECISIONS)}; GPU only, the CPU always trains in fp32"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "group": _OPTIMISATION, "help": "recompute activations in backward: less memory, ~30% slower",
        "default_help": "off"})
    noise_offset: float = field(default=0.01, metadata={"group": _OPTIMISATION, "help": "noise offset"})
    snr_gamma: float = field(default=0.0, metadata={
        "group": _OPTIMISATION, "help": "min-SNR loss weighting gamma, e.g. 5; 0 turns it off"})
    # interference control: the text-side locality term (trainer.locality_loss)
    locality_weight: float = field(default=0.0, metadata={
        "group": _OPTIMISATION, "help": "keep the text encoder's and the cross-attention keys/values' outputs at the "
                                       "base model's on prompts without the token (its captions with the token "
                                       "dropped or replaced by random foreign token vectors, and the empty prompt "
                                       "of classifier-free guidance), so the concept stays out of other concepts' "
                                       "way; 0: off"})
    locality_captions: str | Path | None = field(default=None, metadata={
        "group": _OPTIMISATION, "metavar": "FILE", "default_help": "none",
        "help": "a text file of ordinary captions of the base model's domain, one per line (the kind of file "
                "`fuse --prior-prompts` takes): the locality term also holds --batch-size of them, drawn at random, "
                "at the base model's outputs every step, so the concept leaves prompts unlike its own captions alone "
                "too, and closed-form fusion keeps them mapped as the base does; used with --locality-weight > 0"})
    num_vectors: int = field(default=2, metadata={
        "group": _TOKEN, "help": "embedding vectors of the token: <tok>, <tok>_1, ..."})
    emb_norm_cap: float | None = field(default=None, metadata={
        "group": _TOKEN, "help": "largest norm of a token vector; 0 turns it off",
        "default_help": "1.4x the vocabulary's mean norm, about 0.55 on SD 1.5"})
    prior_dir: str | Path | None = field(default=None, metadata={
        "group": _DATA, "metavar": "DIR", "default_help": "none",
        "help": "images of the class (or ordinary renders) mixed into every batch to keep the base model's prior; "
                "captions default to 'a photo of a {class_word}'"})
    prior_weight: float = field(default=1.0, metadata={"group": _DATA, "help": "loss weight of the prior images"})
    mask_floor: float = field(default=0.0, metadata={
        "group": _DATA, "help": "loss weight of the background where masks are given, 0..1"})
    flip: bool = field(default=True, metadata={"group": _DATA, "help": "no random horizontal flips (text, logos)"})
    checkpoint_every: int = field(default=250, metadata={
        "group": _BOOKKEEPING, "help": "write a resumable checkpoint every N steps; 0: only on Ctrl-C"})
    resume: bool = field(default=False, metadata={
        "group": _BOOKKEEPING, "help": "continue from the newest checkpoint of --out"})
    validation_prompts: Sequence[str] = field(default_factory=tuple, metadata={
        "group": _BOOKKEEPING, "flag": "--validation-prompt", "metavar": "P",
        "help": "prompt to sample during training and in the preview; repeatable",
        "default_help": "the caption template for the preview only"})
    validate_every: int = field(default=0, metadata={
        "group": _BOOKKEEPING, "help": "sample the validation prompts every N steps into <out stem>_samples/; 0: never"})
    sample_steps: int = field(default=25, metadata={"group": _BOOKKEEPING, "help": "denoising steps of samples"})
    preview_images: int = field(default=4, metadata={
        "group": _BOOKKEEPING, "help": "images per prompt in the final preview grid; 0: no preview"})
    concepts_dir: str | Path | None = field(default=None, metadata={
        "group": _BOOKKEEPING, "metavar": "DIR", "default_help": "the folder of --out",
        "help": "folder of the concepts this one will be fused with: --band auto avoids their bands"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace an existing --out (and its old checkpoints)"})

    def __post_init__(self) -> None:
        if isinstance(self.base, str):
            self.base = BaseSpec(self.base)

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
        if self.locality_captions is not None:
            read_prompts(self.locality_captions, "--locality-captions")
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
        self.base.check()
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


# What names a run (photos, token, output, base, folders on this machine) or may touch files beyond it (overwrite,
# resume): never taken from a base's recommended settings.
PER_RUN_FIELDS = frozenset({"photo_dir", "token", "out", "class_word", "base", "concepts_dir", "prior_dir",
                            "overwrite", "resume"})


def recommended_settings(spec: str) -> dict[str, object]:
    """The training settings base `spec`'s folder recommends (`models.training_defaults`), for the CLI and the app to
    use where the user gave none; refused in one line if they name anything but optimisation and adapter settings."""
    recommended = training_defaults(spec)
    unknown = sorted(set(recommended) - ({f.name for f in fields(TrainConfig)} - PER_RUN_FIELDS))
    if unknown:
        raise SpectralDiffusionError(f"the training defaults of base {spec!r} name unknown settings: "
                                     f"{', '.join(unknown)}")
    return recommended
