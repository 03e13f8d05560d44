"""Loading a base model from one `--base SPEC`: `toy`, a diffusers folder, an SD 1.x single file, or a hub id.

`BaseSpec` is the one description of a base model (spec, config, allow-pickle, device, dtype): every command's
`--base` flags come from its fields, training (`TrainConfig.base`) and the app hold one, so a model that trains also
fuses and generates. `BaseSpec.load()` gives the pipeline with its fingerprint, computed once (`LoadedBase`).
Single files load fully offline: diffusers' own converter with the SD 1.5 configs shipped in `configs/sd15/`
(or `--config DIR` for a model with other shapes). Pickled checkpoints can run code when unpickled, so they are
refused unless the user passes `--allow-pickle`: a single `.ckpt` file, and a diffusers folder whose component
holds only pickled weights (`unet/diffusion_pytorch_model.bin`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from diffusers import StableDiffusionPipeline

from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.fingerprint import base_fingerprint
from spectral_diffusion.single_file import check_sd1_single_file

_PACKAGE_DIR = Path(__file__).resolve().parent
SD15_CONFIG_DIR = _PACKAGE_DIR / "configs" / "sd15"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_NO_SAFETY = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


class BuiltinBase(NamedTuple):
    """A base model shipped in the package as a diffusers folder, loadable by its short name."""

    folder: Path
    missing_hint: str  # what to do when the folder has not been built


# Built-in bases by `--base` name. Only their folders are named here: loading one needs no code of what built it,
# so the product never imports the toy world.
BUILTIN_BASES: dict[str, BuiltinBase] = {
    "toy": BuiltinBase(_PACKAGE_DIR / "toyworld" / "model", "run `spectral-diffusion toyworld pretrain`"),
}


TRAINING_DEFAULTS_FILE = "training_defaults.json"


def training_defaults(spec: str) -> dict[str, object]:
    """The training recipe recommended for base `spec`: `TrainConfig` fields from `training_defaults.json` in its
    folder (a built-in base's, or a diffusers folder given by path); `{}` when it has none (TrainConfig's defaults,
    tuned for SD 1.5, apply).

    Why a file beside the weights: the recipe belongs to the model it was tuned on, it travels with the folder
    (copied, packaged or passed by path), and reading it needs no code of what built the model, so the product keeps
    off the toy world (the bundled toy base's file is `toyworld.recipe.RECIPE.settings("additive")` plus no flips,
    and a test keeps the two equal). `TrainConfig` refuses unknown keys, so a stale file fails loudly. A file it names
    (`locality_captions`: captions of the base's domain) is read relative to the folder.
    """
    builtin = BUILTIN_BASES.get(spec)
    folder = builtin.folder if builtin is not None else Path(spec).expanduser()
    path = folder / TRAINING_DEFAULTS_FILE
    if not path.is_file():
        return {}
    settings = _read_json_object(path, "a JSON object of training settings")
    if isinstance(settings.get("locality_captions"), str):
        settings["locality_captions"] = str(folder / settings["locality_captions"])
    return settings


def _read_json_object(path: Path, what: str) -> dict:
    """The JSON object in `path`; a file that is not one is refused in one line naming `what` it should be."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpectralDiffusionError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise SpectralDiffusionError(f"{path}: expected {what}")
    return data


def resolve_device(device: str | None = None) -> torch.device:
    """`device`, or CUDA when there is one, else CPU; refuses a device this machine lacks."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise SpectralDiffusionError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise SpectralDiffusionError(f"device {device!r} requested but CUDA is not available here")
    return resolved


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (half the memory, tensor cores); fp32 on CPU, which has no fast half precision."""
    return torch.float16 if device.type == "cuda" else torch.float32


_GROUP = "base model"  # the argument group of the `--base` flags


@dataclass(frozen=True)
class BaseSpec:
    """Which base model, and how to load it. Each field's metadata is its flag, shared by every command
    (`cli/options.py`); `dtype` None is fp16 on CUDA and fp32 on CPU (the trainer: from its mixed precision)."""

    spec: str = field(default="toy", metadata={
        "group": _GROUP, "flag": "--base", "metavar": "SPEC",
        "help": "'toy' (bundled toy model), a diffusers folder, an SD 1.x .safetensors file or a hub id"})
    config: str | None = field(default=None, metadata={
        "group": _GROUP, "metavar": "DIR", "default_help": "shipped SD 1.5",
        "help": "diffusers config folder for a single file whose shapes differ from SD 1.5"})
    allow_pickle: bool = field(default=False, metadata={
        "group": _GROUP, "help": "allow .ckpt/.pt/.pth/.bin (pickle) checkpoints"})
    device: str | None = field(default=None, metadata={
        "group": _GROUP, "help": "cpu, cuda or cuda:N", "default_help": "cuda if available"})
    dtype: str | None = field(default=None, metadata={
        "group": _GROUP, "choices": tuple(sorted(DTYPES)), "help": "weight precision",
        "default_help": "fp16 on CUDA, fp32 on CPU"})

    def check(self) -> None:
        """Refuse a dtype name that is not one of `DTYPES`, before anything loads."""
        if self.dtype is not None and self.dtype not in DTYPES:
            raise SpectralDiffusionError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    def load(self) -> LoadedBase:
        """A fresh pipeline of this base model, with its fingerprint."""
        self.check()
        pipe = load_base(self.spec, device=self.device, dtype=DTYPES[self.dtype] if self.dtype else None,
                         allow_pickle=self.allow_pickle, config=self.config)
        return LoadedBase(self, pipe, base_fingerprint(pipe.unet, pipe.text_encoder))


@dataclass(frozen=True)
class LoadedBase:
    """A base model as `BaseSpec.load` gave it. `fingerprint` is that of the weights as loaded: what runs next on
    the fresh pipeline (training, composing, fusing) checks concepts against it instead of hashing the weights
    again; once the weights were changed (fused), `fingerprint.base_fingerprint` says what they are."""

    spec: BaseSpec
    pipe: StableDiffusionPipeline
    fingerprint: str


def load_base(
    spec: str = "toy",
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    config: str | Path | None = None,
) -> StableDiffusionPipeline:
    """Load the base pipeline named by `spec` on `device` in `dtype`, safety checker off.

    `config` is the diffusers config folder for a single file whose shapes differ from SD 1.5's.
    """
    target = resolve_device(device)
    dtype = dtype or default_dtype(target)
    pipe = _load(spec, dtype, allow_pickle, config)
    pipe.to(target)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load(
    spec: str, dtype: torch.dtype, allow_pickle: bool, config: str | Path | None
) -> StableDiffusionPipeline:
    builtin = BUILTIN_BASES.get(spec)
    if builtin is not None:
        if not (builtin.folder / "model_index.json").is_file():
            raise SpectralDiffusionError(
                f"the bundled {spec} model is missing ({builtin.folder}): {builtin.missing_hint} "
                "or pass --base with another model"
            )
        return _load_folder(builtin.folder, dtype, allow_pickle)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_folder(path, dtype, allow_pickle)
    if path.is_file():
        return _load_single_file(path, dtype, allow_pickle, config)
    if _looks_like_path(spec):
        raise SpectralDiffusionError(f"base model {spec!r} not found: no such file or folder")
    return _load_hub(spec, dtype)


def _looks_like_path(spec: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else the user typed was meant as a path."""
    return (
        spec.startswith((".", "/", "~"))
        or spec.count("/") > 1
        or "\\" in spec
        or Path(spec).suffix.lower() in (".safetensors", *PICKLE_SUFFIXES)
    )


def _load_folder(path: Path, dtype: torch.dtype, allow_pickle: bool) -> StableDiffusionPipeline:
    index = path / "model_index.json"
    if not index.is_file():
        raise SpectralDiffusionError(f"{path} is a folder without model_index.json: not a diffusers pipeline")
    components = _read_json_object(index, "a diffusers model index (a JSON object)")
    missing = [c for c in _REQUIRED_COMPONENTS if c not in components]
    if missing or "text_encoder_2" in components:
        kind = components.get("_class_name", "an unknown pipeline")
        raise SpectralDiffusionError(f"{path} holds {kind}, not a Stable Diffusion 1.x pipeline")
    if not allow_pickle:
        _refuse_pickled_components(path, components)
    # use_safetensors: without --allow-pickle diffusers must not fall back to a pickle beside the safetensors files
    return _wrap_load_errors(
        f"{path}",
        lambda: StableDiffusionPipeline.from_pretrained(
            path, dtype=dtype, use_safetensors=None if allow_pickle else True, **_NO_SAFETY
        ),
        hint="",
    )


def _refuse_pickled_components(path: Path, components: dict) -> None:
    """Refuse a component folder whose weights are pickles only (diffusers prefers .safetensors when both exist)."""
    for name in components:
        folder = path / name
        if not folder.is_dir() or any(folder.glob("*.safetensors")):
            continue
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise SpectralDiffusionError(
                f"{folder / pickles[0]}: the {name} weights are Python pickles that can run code when loaded; "
                "convert them to .safetensors, or pass --allow-pickle if you trust their source"
            )


def _load_single_file(
    path: Path, dtype: torch.dtype, allow_pickle: bool, config: str | Path | None
) -> StableDiffusionPipeline:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise SpectralDiffusionError(
                f"{path}: {suffix} checkpoints are Python pickles that can run code when loaded; "
                "use a .safetensors file, or pass --allow-pickle if you trust its source"
            )
    elif suffix == ".safetensors":
        check_sd1_single_file(path)
    else:
        raise SpectralDiffusionError(f"{path}: unsupported file type {suffix!r} (expected .safetensors)")
    config_dir = Path(config).expanduser() if config else SD15_CONFIG_DIR
    if not (config_dir / "model_index.json").is_file():
        raise SpectralDiffusionError(
            f"--config {config_dir}: not a diffusers config folder (no model_index.json)"
        )
    hint = (
        ""
        if config
        else "; if the model is not SD 1.5-shaped, pass --config with its diffusers config folder"
    )
    pipe = _wrap_load_errors(
        f"{path} (config {config_dir})",
        lambda: StableDiffusionPipeline.from_single_file(
            str(path), config=str(config_dir), local_files_only=True, dtype=dtype, **_NO_SAFETY
        ),
        hint,
    )
    _check_fully_loaded(pipe, path, config_dir)
    return pipe


def _check_fully_loaded(pipe: StableDiffusionPipeline, path: Path, config_dir: Path) -> None:
    """diffusers leaves weights missing from a single file on the meta device; refuse such a model."""
    for name in ("unet", "vae", "text_encoder"):
        empty = [k for k, v in getattr(pipe, name).state_dict().items() if v.is_meta]
        if empty:
            raise SpectralDiffusionError(
                f"{path}: {len(empty)} {name} weights (e.g. {empty[0]}) are not in the file for the config "
                f"{config_dir}; pass --config with the model's own diffusers config folder"
            )


def _load_hub(repo_id: str, dtype: torch.dtype) -> StableDiffusionPipeline:
    try:
        return StableDiffusionPipeline.from_pretrained(repo_id, dtype=dtype, **_NO_SAFETY)
    except OSError as exc:
        raise SpectralDiffusionError(
            f"base model {repo_id!r} is no local file or folder, and could not be fetched from the Hugging Face "
            "Hub (offline, or no such model); pass a local diffusers folder or an SD 1.x .safetensors file"
        ) from exc


def _wrap_load_errors(
    what: str, load: Callable[[], StableDiffusionPipeline], hint: str
) -> StableDiffusionPipeline:
    """Turn diffusers' shape / key / file errors for a local model into one clear line."""
    try:
        return load()
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if len(reason) > 200:
            reason = reason[:200] + "..."
        raise SpectralDiffusionError(f"could not load {what}: {reason}{hint}") from exc
