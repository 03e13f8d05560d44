"""Fusing concept files into a pipeline's weights: the concept-set checks, `fuse`, and the report it returns.

Disjoint bands are what keeps one concept from overwriting another, so overlapping bands (for `spectral`), another
base model and duplicate tokens are refused before the pipeline is touched.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from torch import nn

from spectral_diffusion.adapters.config import SPECTRAL_VARIANTS
from spectral_diffusion.adapters.inject import adapter_layers
from spectral_diffusion.adapters.layers import Factors, merge_delta, unwrap
from spectral_diffusion.adapters.targets import adaptable_layers
from spectral_diffusion.bands import shared_columns, weight_matrix
from spectral_diffusion.concept_file import Concept, ConceptMeta, load_concept, read_meta
from spectral_diffusion.errors import SpectralDiffusionError, check_number
from spectral_diffusion.fingerprint import base_fingerprint
from spectral_diffusion.fusion.methods import (
    LOW_RANK_METHODS,
    METHODS,
    GradientStats,
    concat_factors,
    merged_delta,
    record_gradient_stats,
    record_text_stats,
)
from spectral_diffusion.tokens import add_concept_tokens, check_new_token

FUSION_FORMAT_VERSION = 1


# ---- concepts ----------------------------------------------------------------------------------------------


@dataclass
class FusedConcept:
    """One fused concept as `fusion.json` records it."""

    path: str | None
    token: str
    token_names: list[str]
    variant: str
    rank: int
    band: int | None
    base_fingerprint: str
    weight: float


@dataclass
class FusionReport:
    """What `fuse` did. `low_rank` (not serialised) is the exact merged delta per layer for LoRA output."""

    method: str
    concepts: list[FusedConcept]
    base_fingerprint: str
    layers: int
    seconds: float
    options: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    low_rank: dict[str, Factors] | None = field(default=None, repr=False)

    @property
    def weights(self) -> list[float]:
        return [c.weight for c in self.concepts]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["low_rank"]
        return {"format_version": FUSION_FORMAT_VERSION, **data, "weights": self.weights}

    def summary(self) -> str:
        names = ", ".join(f"{c.token} x{c.weight:g}" for c in self.concepts)
        return f"fused {len(self.concepts)} concepts ({names}) with {self.method} into {self.layers} layers " \
               f"in {self.seconds:.2f} s"


def load_concepts(sources: Sequence[Concept | str | Path]) -> list[tuple[Concept, str | None]]:
    """Concept objects with the path each came from (None for in-memory concepts)."""
    return [(s, None) if isinstance(s, Concept) else (load_concept(s), str(s)) for s in sources]


def _label(path: str | None, meta: ConceptMeta) -> str:
    return f"{Path(path).name} ({meta.token})" if path else meta.token


def check_concepts(concepts: Sequence[tuple[Concept, str | None]], fingerprint: str, tokenizer: Any, *,
                   check_bands: bool, allow_overlap: bool = False) -> None:
    """Refuse concepts of another base model, tokens used twice or already in `tokenizer`, and (with
    `check_bands`) spectral concepts sharing singular-vector columns; `allow_overlap` turns that into a warning."""
    seen: dict[str, str] = {}
    for concept, path in concepts:
        meta, label = concept.meta, _label(path, concept.meta)
        if meta.base_fingerprint != fingerprint:
            raise SpectralDiffusionError(
                f"concept {label} was trained on base model {meta.base_fingerprint}, but the loaded base is "
                f"{fingerprint}; load the base it was trained on")
        for name in meta.token_names:
            if name in seen:
                raise SpectralDiffusionError(f"concepts {seen[name]} and {label} both use the token {name!r}")
            seen[name] = label
        check_new_token(tokenizer, meta.token, len(meta.token_names))
    if not check_bands:
        return
    spectral = [(c, p) for c, p in concepts if c.meta.variant in SPECTRAL_VARIANTS]
    for i, (a, path_a) in enumerate(spectral):
        for b, path_b in spectral[i + 1:]:
            shared = shared_columns(a.meta.band, a.meta.rank, b.meta.band, b.meta.rank)
            if shared is None:
                continue
            message = (f"concepts {_label(path_a, a.meta)} (band {a.meta.band}, rank {a.meta.rank}) and "
                       f"{_label(path_b, b.meta)} (band {b.meta.band}, rank {b.meta.rank}) share singular-vector "
                       f"columns [{shared.start}, {shared.stop})")
            if not allow_overlap:
                raise SpectralDiffusionError(
                    message + "; retrain one in a free band, or pass --allow-overlap to add them anyway")
            warnings.warn(message + ": they will interfere (--allow-overlap)", stacklevel=3)


def add_tokens(pipe: StableDiffusionPipeline, concepts: Sequence[Concept]) -> None:
    """Add the concepts' tokens and embedding rows to the pipeline's tokenizer and text encoder."""
    for concept in concepts:
        add_concept_tokens(pipe.tokenizer, pipe.text_encoder, concept.meta.token, concept.token_embeddings)


# ---- fusing ------------------------------------------------------------------------------------------------


def fuse(concepts: Sequence[Concept | str | Path], pipe: StableDiffusionPipeline, method: str = "spectral",
         weights: Sequence[float] | None = None, *, allow_overlap: bool = False, seed: int = 0,
         density: float = 0.5, ridge: float = 1e-4, record_steps: int = 4,
         record_size: int | None = None, prior_weight: float = 1.0,
         prior_prompts: Sequence[str] = (), fingerprint: str | None = None) -> FusionReport:
    """Merge `concepts` into `pipe`'s UNet / text-encoder weights in place and add all their tokens.

    `density`: fraction of entries kept by `ties` / `dare`; `seed`: DARE's drop pattern and gradient fusion's
    sampling noise; `ridge`: gradient and closed-form fusion; `record_steps`, `record_size` (px, default the model's
    native size): gradient fusion; `prior_weight`: closed-form fusion's weight of ordinary prompts, `prior_prompts`:
    more of them (captions of the base model's domain, as Custom Diffusion regularises with LAION captions).
    `fingerprint`: that of `pipe` fresh from `BaseSpec.load` (`LoadedBase.fingerprint`), so the weights are not
    hashed again; computed when not given. Every check runs before the pipeline is touched.
    """
    start = time.perf_counter()
    weights = check_request(concepts, method, weights, density=density, ridge=ridge, record_steps=record_steps,
                            prior_weight=prior_weight, prior_prompts=prior_prompts)
    if adapter_layers(pipe.unet, pipe.text_encoder):
        raise SpectralDiffusionError("the pipeline has live adapters; fuse into a plain base model")
    loaded = load_concepts(concepts)
    fingerprint = fingerprint or base_fingerprint(pipe.unet, pipe.text_encoder)
    check_concepts(loaded, fingerprint, pipe.tokenizer, check_bands=method == "spectral", allow_overlap=allow_overlap)
    modules = adaptable_layers(pipe.unet, pipe.text_encoder)
    scale = 1 / len(loaded) if method == "mean" else 1.0
    factors = _weighted_factors(loaded, weights, scale, modules)

    add_tokens(pipe, [concept for concept, _ in loaded])
    options: dict[str, Any] = {}
    if method in ("ties", "dare"):
        options["density"] = density
    if method in ("dare", "gradient"):
        options["seed"] = seed
    timings: dict[str, float] = {}
    stats: dict[str, GradientStats] = {}
    if method == "gradient":
        options.update(ridge=ridge, record_steps=record_steps, record_size=record_size)
        recording = time.perf_counter()
        stats = record_gradient_stats(pipe, loaded, weights, factors, steps=record_steps, size=record_size,
                                      seed=seed)
        timings["record"] = time.perf_counter() - recording
    if method == "closed-form":
        # the prompts themselves go into fusion.json: the merge can be redone from the record
        options.update(ridge=ridge, prior_weight=prior_weight, prior_prompts=list(prior_prompts))
        recording = time.perf_counter()
        stats = record_text_stats(pipe, loaded, weights, factors, prior_weight=prior_weight,
                                  prior_prompts=prior_prompts)
        timings["record"] = time.perf_counter() - recording
    merging = time.perf_counter()
    with torch.no_grad():
        for name, per in factors.items():
            if name in stats:
                delta = stats[name].solve(ridge)
            else:  # closed-form fusion sums the layers that do not read the text alone
                delta = merged_delta("sum" if method == "closed-form" else method, name, per, density=density,
                                     seed=seed)
            merge_delta(modules[name], delta)
    timings["solve" if stats else "merge"] = time.perf_counter() - merging
    low_rank = None
    if method in LOW_RANK_METHODS:
        low_rank = {name: concat_factors([f for f in per if f is not None]) for name, per in factors.items()}
    seconds = time.perf_counter() - start
    timings["total"] = seconds
    fused = [FusedConcept(p, c.meta.token, list(c.meta.token_names), c.meta.variant, c.meta.rank, c.meta.band,
                          c.meta.base_fingerprint, w) for (c, p), w in zip(loaded, weights, strict=True)]
    return FusionReport(method, fused, fingerprint, len(factors), seconds, options, timings, low_rank)


def check_request(concepts: Sequence[Concept | str | Path], method: str = "spectral",
                  weights: Sequence[float] | None = None, *, density: float = 0.5, ridge: float = 1e-4,
                  record_steps: int = 4, prior_weight: float = 1.0, prior_prompts: Sequence[str] = ()) -> list[float]:
    """What `fuse` refuses before it needs the pipeline, so that a caller can ask before one loads (the CLI does):
    the method and its options, the weights, and each concept's metadata (a missing or foreign file, a variant the
    method cannot fuse). Returns the weights as floats, one per concept (1 each when None)."""
    if method not in METHODS:
        raise SpectralDiffusionError(f"unknown fusion method {method!r}; choose one of {', '.join(METHODS)}")
    if not concepts:
        raise SpectralDiffusionError("nothing to fuse: give at least one concept file")
    weights = weights_for(len(concepts), weights)
    for i, weight in enumerate(weights):
        check_number(weight, f"the weight of concept {i + 1}")
    if method in ("ties", "dare") and not 0 < density <= 1:
        raise SpectralDiffusionError(f"density must be in (0, 1], got {density:g}")
    check_number(ridge, "ridge", low=0)
    check_number(prior_weight, "prior weight", low=0)
    if record_steps < 1:
        raise SpectralDiffusionError(f"--record-steps must be >= 1, got {record_steps}")
    if prior_prompts and method != "closed-form":
        raise SpectralDiffusionError(f"prior prompts are for closed-form fusion; {method} does not use them")
    metas = [(c.meta, None) if isinstance(c, Concept) else (read_meta(c), str(c)) for c in concepts]
    other = [f"{_label(path, meta)} is {meta.variant}" for meta, path in metas if meta.variant not in SPECTRAL_VARIANTS]
    if method == "spectral" and other:
        raise SpectralDiffusionError(
            f"spectral fusion needs additive or rotational concepts ({'; '.join(other)}); use --method sum")
    return weights


def weights_for(count: int, weights: Sequence[float] | None) -> list[float]:
    """One weight per concept, as floats (1 each when None); another number of weights is refused."""
    if weights is None:
        return [1.0] * count
    if len(weights) != count:
        raise SpectralDiffusionError(f"{len(weights)} weights given for {count} concepts")
    return [float(w) for w in weights]


def _weighted_factors(concepts: Sequence[tuple[Concept, str | None]], weights: Sequence[float], scale: float,
                      modules: Mapping[str, nn.Module]) -> dict[str, list[Factors | None]]:
    """Per layer, each concept's `(w_i * scale * up, down)` on the layer's device, or None where it has no delta."""
    out: dict[str, list[Factors | None]] = {}
    for i, ((concept, path), weight) in enumerate(zip(concepts, weights, strict=True)):
        for name in concept.layers:
            if name not in modules:
                raise SpectralDiffusionError(
                    f"concept {_label(path, concept.meta)} adapts layer {name}, which this base model lacks")
            target = weight_matrix(unwrap(modules[name]))
            up, down = concept.delta_factors(name)
            if (up.shape[0], down.shape[1]) != tuple(target.shape):
                raise SpectralDiffusionError(
                    f"concept {_label(path, concept.meta)}: layer {name} is {tuple(target.shape)} in this base "
                    f"model but {up.shape[0]}x{down.shape[1]} in the concept")
            out.setdefault(name, [None] * len(concepts))[i] = (
                (weight * scale * up).to(target.device), down.to(target.device))
    return dict(sorted(out.items()))

