"""The concept file: one self-contained `.safetensors` per trained concept.

Tensors: every adapted layer's state tensors as `"<layer name>::<state name>"` (band slices and trainable values,
whatever the variant's `Adapter.state_tensors()` holds), plus `"token_embeddings"` [n_vectors, dim]. The header's
`__metadata__` holds one JSON object under `"spectral_diffusion"` (`ConceptMeta` plus the layer list). Fusion, live
composition and LoRA export need nothing else: no base-model SVD, no training state. Stored in fp32 so the
weight change rebuilt from the factors is exact.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from spectral_diffusion import __version__
from spectral_diffusion.adapters.config import SPECTRAL_VARIANTS
from spectral_diffusion.adapters.layers import Factors, adapter_type, delta_factors
from spectral_diffusion.atomic import atomic_write
from spectral_diffusion.errors import SpectralDiffusionError

FORMAT_VERSION = 1
METADATA_KEY = "spectral_diffusion"
TOKEN_KEY = "token_embeddings"
SEP = "::"


def canonical_token(token: str) -> str:
    """The one spelling of a trigger word: lower case. CLIP lower-cases prompts, and diffusers'
    `load_textual_inversion` adds a token as a normalised entry that only lower-case text matches (and expands a
    multi-vector token only when spelled exactly so), so a lower-case token is the one spelling that works the same
    here, in diffusers, and in A1111 / ComfyUI (embedding file `<token>.safetensors`)."""
    return token.lower()


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class ConceptMeta:
    """What a concept is and how it was made. `band` is None for the non-spectral baselines (lora, ortho)."""

    variant: str
    rank: int
    band: int | None
    targets: str
    base_fingerprint: str
    token: str
    token_names: list[str]
    class_word: str = ""
    # [kh, kw] of each adapted convolution (1x1 included), by layer name: how export unfolds its factors
    kernels: dict[str, list[int]] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=_utc_now)
    tool_version: str = __version__
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        # One spelling per token, also for files written before tokens were stored lower-case (types are checked
        # later, by `_check`).
        if isinstance(self.token, str):
            self.token = canonical_token(self.token)
        if isinstance(self.token_names, list):
            self.token_names = [canonical_token(n) if isinstance(n, str) else n for n in self.token_names]


@dataclass
class Concept:
    """A concept in memory: metadata, per-layer adapter state tensors, and the token's embedding rows."""

    meta: ConceptMeta
    layers: dict[str, dict[str, torch.Tensor]]
    token_embeddings: torch.Tensor

    def delta_factors(self, layer: str) -> Factors:
        """fp32 `(up [out, k], down [k, in])` with `dW = up @ down` for one layer."""
        return delta_factors(self.meta.variant, self.layers[layer])


def save_concept(path: str | Path, concept: Concept, *, overwrite: bool = False) -> Path:
    """Validate and write `concept` to `path` atomically; refuses to replace an existing file unless `overwrite`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise SpectralDiffusionError(f"{path} already exists (pass --overwrite to replace it)")
    _check(concept, str(path))
    tensors = {
        f"{layer}{SEP}{key}": t.detach().to("cpu", torch.float32).contiguous()
        for layer, state in concept.layers.items()
        for key, t in state.items()
    }
    tensors[TOKEN_KEY] = concept.token_embeddings.detach().to("cpu", torch.float32).contiguous()
    header = {**asdict(concept.meta), "layers": sorted(concept.layers)}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(header, sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_meta(path: str | Path) -> ConceptMeta:
    """The metadata of a concept file, reading only its header (cheap: for listings and band allocation)."""
    return _parse_header(_read_header(Path(path)), str(path))[0]


def load_concept(path: str | Path) -> Concept:
    """Load and validate a concept file; every problem is one `SpectralDiffusionError` naming the file."""
    path = Path(path)
    meta, layer_names = _parse_header(_read_header(path), str(path))
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise SpectralDiffusionError(
            f"{path}: unreadable tensors ({exc}); the file may be truncated"
        ) from exc
    if TOKEN_KEY not in tensors:
        raise SpectralDiffusionError(f"{path}: no {TOKEN_KEY!r} tensor")
    layers: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layer_names}
    for key, tensor in tensors.items():
        if key == TOKEN_KEY:
            continue
        layer, sep, state_name = key.rpartition(SEP)
        if not sep or layer not in layers:
            raise SpectralDiffusionError(f"{path}: tensor {key!r} belongs to no layer listed in the metadata")
        layers[layer][state_name] = tensor
    concept = Concept(meta, layers, tensors[TOKEN_KEY])
    _check(concept, str(path))
    return concept


def _read_header(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise SpectralDiffusionError(f"concept file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise SpectralDiffusionError(
            f"{path}: not a concept file (not a readable .safetensors file: {exc})"
        ) from exc


def _parse_header(metadata: Mapping[str, str], where: str) -> tuple[ConceptMeta, list[str]]:
    if METADATA_KEY not in metadata:
        raise SpectralDiffusionError(
            f"{where}: no spectral-diffusion metadata; not a concept file (a LoRA or another tool's file?)"
        )
    try:
        data = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise SpectralDiffusionError(f"{where}: corrupt concept metadata ({exc})") from exc
    if not isinstance(data, dict):
        raise SpectralDiffusionError(f"{where}: corrupt concept metadata (not a JSON object)")
    version = data.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise SpectralDiffusionError(f"{where}: concept metadata has no valid format_version")
    if version > FORMAT_VERSION:
        raise SpectralDiffusionError(
            f"{where}: concept format version {version} is newer than this spectral-diffusion reads "
            f"({FORMAT_VERSION}); upgrade spectral-diffusion"
        )
    layer_names = data.pop("layers", None)
    known = {f.name: f for f in fields(ConceptMeta)}
    absent = [n for n, f in known.items() if f.default is f.default_factory is MISSING and n not in data]
    if absent or not isinstance(layer_names, list):
        raise SpectralDiffusionError(f"{where}: concept metadata lacks {', '.join(absent or ['layers'])}")
    # Keys this version does not know (added by a later writer of the same format version) are ignored.
    meta = ConceptMeta(**{k: v for k, v in data.items() if k in known})
    return meta, [str(n) for n in layer_names]


def _check(concept: Concept, where: str) -> None:
    """Everything a consumer relies on: known variant, rank/band consistent, every layer's tensors well formed."""
    meta = concept.meta
    try:
        cls = adapter_type(meta.variant)
    except SpectralDiffusionError as exc:
        raise SpectralDiffusionError(f"{where}: {exc}") from None
    if not isinstance(meta.rank, int) or meta.rank < 1:
        raise SpectralDiffusionError(f"{where}: invalid rank {meta.rank!r}")
    if meta.variant in SPECTRAL_VARIANTS and (not isinstance(meta.band, int) or meta.band < 0):
        raise SpectralDiffusionError(
            f"{where}: a {meta.variant} concept needs a band >= 0, got {meta.band!r}"
        )
    names = meta.token_names
    if (
        not isinstance(meta.token, str)
        or not isinstance(names, list)
        or not all(isinstance(n, str) for n in names)
    ):
        raise SpectralDiffusionError(f"{where}: token must be a string and token_names a list of strings")
    if not concept.layers:
        raise SpectralDiffusionError(f"{where}: the concept adapts no layer")
    in_features = {}
    for layer, state in concept.layers.items():
        try:
            sizes = cls.validate(state)
        except SpectralDiffusionError as exc:
            raise SpectralDiffusionError(f"{where}: layer {layer}: {exc}") from None
        in_features[layer] = sizes["in"]
        if sizes["r"] != meta.rank:
            raise SpectralDiffusionError(
                f"{where}: layer {layer} has rank {sizes['r']}, metadata says {meta.rank}"
            )
        _check_values(state.values(), f"{where}: layer {layer}")
    if not isinstance(meta.kernels, dict):
        raise SpectralDiffusionError(f"{where}: kernels must map layer names to [kh, kw], got {meta.kernels!r}")
    for layer, kernel in meta.kernels.items():
        if (layer not in in_features or not isinstance(kernel, list) or len(kernel) != 2
                or not all(isinstance(k, int) and k > 0 for k in kernel)
                or in_features[layer] % (kernel[0] * kernel[1])):
            raise SpectralDiffusionError(f"{where}: invalid conv kernel {kernel!r} for layer {layer}")
    emb = concept.token_embeddings
    if emb.ndim != 2 or emb.shape[0] != len(meta.token_names) or emb.shape[0] < 1:
        raise SpectralDiffusionError(
            f"{where}: token_embeddings has shape {tuple(emb.shape)}, expected [{len(meta.token_names)}, dim] "
            f"for tokens {meta.token_names}"
        )
    _check_values([emb], f"{where}: token_embeddings")


def _check_values(tensors: Iterable[torch.Tensor], where: str) -> None:
    for t in tensors:
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise SpectralDiffusionError(f"{where}: tensors must be finite floating-point values")
