"""Fusing many concept files into one pipeline's weights: the exact spectral sum, and honest baselines.

`spectral` (default) adds `sum_i w_i dW_i` for Spectral Adapter concepts in disjoint SVD bands; the factors come from
each concept file (`Concept.delta_factors`), never from a recomputed SVD. Disjoint bands are what keeps one concept
from overwriting another, so overlapping bands, another base model and duplicate tokens are refused.

Baselines, for the quality benchmark (they accept every adapter variant):
- `sum`: task arithmetic, `W0 + sum_i w_i dW_i` without the band checks.
- `mean`: every delta scaled by `1/N`, what the paper's reference code does (identity fades as N grows).
- `ties`: TIES-merging: trim each delta to its top `density` fraction by magnitude, elect each entry's sign by the
  summed mass, average the deltas that agree with it.
- `dare`: DARE: drop each entry with probability `1 - density` (seeded), rescale the rest by `1/density`, sum.
- `closed-form`: text-side least squares (Custom Diffusion's merge, generalised to every text-fed layer). For each
  layer whose input is the prompt's encoding alone (text encoder, cross-attention keys / values) it solves
  `min_W sum_i ||W X_i - (W0 + w_i dW_i) X_i||^2 + p ||W X_0 - W0 X_0||^2`, with `X_i` that layer's inputs while
  concept `i`'s own model encodes its prompts (its training captions and templates) and `X_0` the base's inputs for
  ordinary prompts (the empty prompt, the class words, the captions without their tokens). Each concept then keeps
  its own mapping of its own token, other concepts' deltas are cancelled on it, and ordinary prompts map as in the
  base. Text encodings only (no image is sampled): seconds. Other layers get the exact sum.
- `gradient`: Mix-of-Show's gradient fusion `min_W sum_i ||W X_i - (W0 + w_i dW_i) X_i||^2`, with `X_i` the layer
  inputs recorded while concept `i`'s model encodes and samples its prompts. Solved per layer in closed form from
  Gram matrices accumulated by forward hooks (no activation is stored), with a small ridge towards `W0`:
  `W = W0 + (sum_i w_i dW_i G_i)(sum_i G_i + lambda I)^-1`, `G_i = X_i X_i^T`, `lambda = ridge * tr(sum G) / in`.
  The reference implementation runs LBFGS on stored activations for minutes per layer; this is one solve.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge
from safetensors.torch import save_file
from torch import nn

from spectral_diffusion.adapters.config import SPECTRAL_VARIANTS
from spectral_diffusion.adapters.inject import adapter_layers, conv_kernels, load_adapter, remove_adapters
from spectral_diffusion.adapters.layers import Factors, layer_generator, unwrap
from spectral_diffusion.adapters.targets import adaptable_layers, is_text_fed
from spectral_diffusion.atomic import atomic_directory, check_writable
from spectral_diffusion.bands import weight_matrix
from spectral_diffusion.concept_file import Concept, ConceptMeta, load_concept
from spectral_diffusion.errors import SpectralDiffusionError, check_number
from spectral_diffusion.export import embedding_file_name, lora_tensors, write_textual_inversion
from spectral_diffusion.fingerprint import base_fingerprint
from spectral_diffusion.single_file import CLIP_PREFIX, pipeline_to_ldm
from spectral_diffusion.tokens import add_concept_tokens, check_new_token, token_ids

METHODS = ("spectral", "closed-form", "mean", "sum", "ties", "dare", "gradient")
LOW_RANK_METHODS = ("spectral", "sum", "mean")  # exact sums of factors: also writable as one LoRA
OUTPUT_FORMATS = ("diffusers", "single-file", "lora")
FUSION_JSON = "fusion.json"
FUSION_FORMAT_VERSION = 1
RECORD_TEMPLATES = ("a photo of {}", "{}", "a close-up photo of {}", "{} in the city")
ORDINARY_TEMPLATES = ("", "a photo of a {}", "a {}", "{}")  # closed-form fusion's prompts that keep the base mapping


# ---- the math, on plain tensors ------------------------------------------------------------------------------


def ties_merge(deltas: Sequence[torch.Tensor], density: float) -> torch.Tensor:
    """TIES-merging of (already weighted) dense deltas: trim, elect sign, disjoint mean.

    The sign election and disjoint mean are PEFT's (`peft.utils.merge_utils`); the trim is kept here because PEFT's
    keeps `int(density * n)` entries (none of a small layer at low density) where this keeps the nearest count, at
    least one. Where the counts agree the result is PEFT's `ties` exactly (tests/test_fusion.py)."""
    trimmed = []
    for delta in deltas:
        keep = max(1, round(density * delta.numel()))
        threshold = delta.abs().flatten().kthvalue(delta.numel() - keep + 1).values
        trimmed.append(torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta)))
    stack = torch.stack(trimmed)
    return disjoint_merge(stack, calculate_majority_sign_mask(stack, method="total"))


def dare_merge(deltas: Sequence[torch.Tensor], density: float,
               generators: Sequence[torch.Generator]) -> torch.Tensor:
    """DARE: keep each entry with probability `density` (one generator per delta), rescale by `1/density`, sum.

    PEFT's `dare_linear` is the same formula but draws from the global RNG; the per-layer generators here make a
    fusion reproducible from its seed whatever ran before."""
    merged = torch.zeros_like(deltas[0])
    for delta, gen in zip(deltas, generators, strict=True):
        keep = torch.rand(delta.shape, generator=gen, dtype=torch.float32) < density
        merged += torch.where(keep.to(delta.device), delta / density, torch.zeros_like(delta))
    return merged


@dataclass
class GradientStats:
    """Sufficient statistics of one layer's gradient-fusion objective, in the delta `D = W - W0`.

    `sum_i ||(D - dW_i) X_i||^2 = tr(D S D^T) - 2 tr(D A^T) + C` with `S = sum_i G_i`, `A = sum_i dW_i G_i`,
    `C = sum_i tr(dW_i G_i dW_i^T)`: enough to solve and to score any candidate `D` without the activations.
    """

    gram: torch.Tensor  # S [in, in]
    cross: torch.Tensor  # A [out, in]
    const: float = 0.0

    @classmethod
    def zeros(cls, out_features: int, in_features: int, device: torch.device) -> GradientStats:
        return cls(torch.zeros(in_features, in_features, device=device),
                   torch.zeros(out_features, in_features, device=device))

    def add(self, gram: torch.Tensor, delta: Factors | None) -> None:
        """Fold in one concept's Gram matrix `G_i` and its (weighted) delta factors (None: it leaves W0 alone)."""
        self.gram += gram
        if delta is not None:
            up, down = delta
            projected = down @ gram  # [k, in]
            self.cross += up @ projected
            self.const += float(((projected @ down.mT) * (up.mT @ up)).sum())

    def solve(self, ridge: float) -> torch.Tensor:
        """The minimising `D = A (S + lambda I)^-1` (fp32), `lambda = ridge * tr(S) / in`; zero if no input."""
        s = self.gram.double()
        scale = float(s.diagonal().mean())
        if scale <= 0:
            return torch.zeros_like(self.cross)
        s.diagonal().add_(ridge * scale)
        chol = torch.linalg.cholesky(s)
        return torch.cholesky_solve(self.cross.double().mT, chol).mT.float()


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
            lo = max(a.meta.band * a.meta.rank, b.meta.band * b.meta.rank)
            hi = min((a.meta.band + 1) * a.meta.rank, (b.meta.band + 1) * b.meta.rank)
            if lo >= hi:
                continue
            message = (f"concepts {_label(path_a, a.meta)} (band {a.meta.band}, rank {a.meta.rank}) and "
                       f"{_label(path_b, b.meta)} (band {b.meta.band}, rank {b.meta.rank}) share singular-vector "
                       f"columns [{lo}, {hi})")
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
         prior_prompts: Sequence[str] = ()) -> FusionReport:
    """Merge `concepts` into `pipe`'s UNet / text-encoder weights in place and add all their tokens.

    `density`: fraction of entries kept by `ties` / `dare`; `seed`: DARE's drop pattern and gradient fusion's
    sampling noise; `ridge`: gradient and closed-form fusion; `record_steps`, `record_size` (px, default the model's
    native size): gradient fusion; `prior_weight`: closed-form fusion's weight of ordinary prompts, `prior_prompts`:
    more of them (captions of the base model's domain, as Custom Diffusion regularises with LAION captions).
    Every check runs before the pipeline is touched.
    """
    start = time.perf_counter()
    weights = [1.0] * len(concepts) if weights is None else [float(w) for w in weights]
    _check_request(method, len(concepts), weights, density, ridge, prior_weight)
    if prior_prompts and method != "closed-form":
        raise SpectralDiffusionError(f"prior prompts are for closed-form fusion; {method} does not use them")
    if adapter_layers(pipe.unet, pipe.text_encoder):
        raise SpectralDiffusionError("the pipeline has live adapters; fuse into a plain base model")
    loaded = load_concepts(concepts)
    if method == "spectral":
        other = [f"{_label(p, c.meta)} is {c.meta.variant}" for c, p in loaded if c.meta.variant not in SPECTRAL_VARIANTS]
        if other:
            raise SpectralDiffusionError(
                f"spectral fusion needs additive or rotational concepts ({'; '.join(other)}); use --method sum")
    fingerprint = base_fingerprint(pipe.unet, pipe.text_encoder)
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
            weight = weight_matrix(unwrap(modules[name]))
            if name in stats:
                delta = stats[name].solve(ridge)
            else:  # closed-form fusion sums the layers that do not read the text alone
                delta = merged_delta("sum" if method == "closed-form" else method, name, per, density=density,
                                     seed=seed)
            weight += delta.to(weight.dtype)
    timings["solve" if stats else "merge"] = time.perf_counter() - merging
    low_rank = None
    if method in LOW_RANK_METHODS:
        low_rank = {name: _concat([f for f in per if f is not None]) for name, per in factors.items()}
    seconds = time.perf_counter() - start
    timings["total"] = seconds
    fused = [FusedConcept(p, c.meta.token, list(c.meta.token_names), c.meta.variant, c.meta.rank, c.meta.band,
                          c.meta.base_fingerprint, w) for (c, p), w in zip(loaded, weights, strict=True)]
    return FusionReport(method, fused, fingerprint, len(factors), seconds, options, timings, low_rank)


def _check_request(method: str, count: int, weights: Sequence[float], density: float, ridge: float,
                   prior_weight: float) -> None:
    if method not in METHODS:
        raise SpectralDiffusionError(f"unknown fusion method {method!r}; choose one of {', '.join(METHODS)}")
    if not count:
        raise SpectralDiffusionError("nothing to fuse: give at least one concept file")
    if len(weights) != count:
        raise SpectralDiffusionError(f"{len(weights)} weights given for {count} concepts")
    for i, weight in enumerate(weights):
        check_number(weight, f"the weight of concept {i + 1}")
    if method in ("ties", "dare") and not 0 < density <= 1:
        raise SpectralDiffusionError(f"density must be in (0, 1], got {density:g}")
    check_number(ridge, "ridge", low=0)
    check_number(prior_weight, "prior weight", low=0)


def merged_delta(method: str, name: str, per_concept: Sequence[Factors | None], *, density: float = 0.5,
                 seed: int = 0) -> torch.Tensor:
    """The dense fp32 weight change of layer `name` under a non-gradient method, from each concept's weighted
    factors (None where a concept leaves the layer alone)."""
    present = [(i, f) for i, f in enumerate(per_concept) if f is not None]
    if method in LOW_RANK_METHODS:
        up, down = _concat([f for _, f in present])
        return up @ down
    dense = [up @ down for _, (up, down) in present]
    if method == "ties":
        return ties_merge(dense, density)
    if method == "dare":
        return dare_merge(dense, density, [layer_generator(seed, f"{name}#{i}") for i, _ in present])
    raise ValueError(f"{method} is not a closed-form merge")


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


def _concat(factors: Sequence[Factors]) -> Factors:
    return torch.cat([u for u, _ in factors], dim=1), torch.cat([d for _, d in factors], dim=0)


def record_prompts(meta: ConceptMeta) -> list[str]:
    """The prompts gradient fusion records a concept's layer inputs on: its token (and class word) in templates."""
    subject = f"{meta.token} {meta.class_word}".strip()
    return [t.format(subject) for t in RECORD_TEMPLATES]


def record_gradient_stats(pipe: StableDiffusionPipeline, concepts: Sequence[tuple[Concept, str | None]],
                          weights: Sequence[float], factors: Mapping[str, Sequence[Factors | None]], *,
                          steps: int = 4, size: int | None = None, seed: int = 0) -> dict[str, GradientStats]:
    """Gradient-fusion statistics of every layer in `factors`: for each concept, run its own model (the concept
    as a live adapter at its weight) on its prompts — text encoding, then `steps` CFG sampling steps — while forward
    hooks accumulate each layer's input Gram matrix, then fold it into `S`, `A`, `C` and drop it.

    The pipeline must hold the concepts' tokens and no adapters; it is left as it was found.
    """
    side = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    stats: dict[str, GradientStats] = {}
    for i, ((concept, _), weight) in enumerate(zip(concepts, weights, strict=True)):
        load_adapter(pipe.unet, pipe.text_encoder, concept.meta.variant, concept.layers, name="fusion", scale=weight)
        try:
            modules = adaptable_layers(pipe.unet, pipe.text_encoder)
            recorder = _GramRecorder({name: modules[name] for name in factors})
            try:
                pipe(prompt=record_prompts(concept.meta), num_inference_steps=steps, guidance_scale=7.5,
                     height=side, width=side, output_type="latent", generator=torch.Generator().manual_seed(seed))
            finally:
                recorder.remove()
        finally:
            remove_adapters(pipe.unet, pipe.text_encoder)
        for name, gram in recorder.grams.items():
            if name not in stats:
                stats[name] = GradientStats.zeros(weight_matrix(unwrap(modules[name])).shape[0], gram.shape[0], gram.device)
            stats[name].add(gram, factors[name][i])
    return stats


def concept_prompts(meta: ConceptMeta) -> list[str]:
    """What closed-form fusion encodes with a concept's own model: its training captions and the templates."""
    return sorted(set(meta.training.get("captions", [])) | set(record_prompts(meta)))


def ordinary_prompts(metas: Sequence[ConceptMeta]) -> list[str]:
    """Prompts whose encoding the fused model must map as the base does: the empty prompt (classifier-free
    guidance reads it), each class word in templates, and every concept's captions without its token."""
    prompts = {t.format(m.class_word).strip() for m in metas for t in ORDINARY_TEMPLATES}
    prompts |= {" ".join(c.replace(m.token, " ").split()) for m in metas for c in m.training.get("captions", [])}
    return sorted(prompts)


def record_text_stats(pipe: StableDiffusionPipeline, concepts: Sequence[tuple[Concept, str | None]],
                      weights: Sequence[float], factors: Mapping[str, Sequence[Factors | None]], *,
                      prior_weight: float = 1.0, prior_prompts: Sequence[str] = ()) -> dict[str, GradientStats]:
    """Closed-form fusion statistics of the text-fed layers in `factors`: each concept's own model (the concept
    live at its weight) encodes `concept_prompts`, the base encodes `ordinary_prompts` and `prior_prompts`.
    Text-encoder layers' input Grams come from forward hooks, the cross-attention keys' and values' from the final
    encodings. Each group's Gram is a mean over its tokens (every concept counts alike, whatever its prompt count),
    the ordinary group's scaled by `prior_weight`. The pipeline must hold the concepts' tokens and no adapters; it is
    left as it was found."""
    names = [name for name in factors if is_text_fed(name)]
    modules = adaptable_layers(pipe.unet, pipe.text_encoder)
    stats: dict[str, GradientStats] = {}

    def accumulate(prompts: list[str], index: int | None, scale: float) -> None:
        for name, gram in _text_grams(pipe, names, prompts).items():
            if name not in stats:
                out_features = weight_matrix(unwrap(modules[name])).shape[0]
                stats[name] = GradientStats.zeros(out_features, gram.shape[0], gram.device)
            stats[name].add(scale * gram, None if index is None else factors[name][index])

    for i, ((concept, _), weight) in enumerate(zip(concepts, weights, strict=True)):
        load_adapter(pipe.unet, pipe.text_encoder, concept.meta.variant, concept.layers, name="fusion", scale=weight)
        try:
            accumulate(concept_prompts(concept.meta), i, 1.0)
        finally:
            remove_adapters(pipe.unet, pipe.text_encoder)
    ordinary = sorted(set(ordinary_prompts([c.meta for c, _ in concepts])) | set(prior_prompts))
    accumulate(ordinary, None, prior_weight)
    return stats


@torch.no_grad()
def _text_grams(pipe: StableDiffusionPipeline, names: Sequence[str], prompts: list[str]) -> dict[str, torch.Tensor]:
    """Per text-fed layer in `names`, the mean over tokens of `x x^T` of its inputs while `pipe` encodes `prompts`
    exactly as it does when sampling (padded to the full context, tokens expanded)."""
    modules = adaptable_layers(pipe.unet, pipe.text_encoder)
    recorder = _GramRecorder({n: modules[n] for n in names if n.startswith("text_encoder.")})
    try:
        hidden = pipe.encode_prompt(prompts, pipe.text_encoder.device, 1, False)[0]
    finally:
        recorder.remove()
    rows = hidden.reshape(-1, hidden.shape[-1]).float()
    grams = {name: gram / len(rows) for name, gram in recorder.grams.items()}
    encoding_gram = rows.mT @ rows / len(rows)
    grams.update({name: encoding_gram for name in names if name.startswith("unet.")})
    return grams


class _GramRecorder:
    """Forward pre-hooks that accumulate each layer's input Gram matrix `X^T X` (fp32): rows are tokens for a
    Linear and unfolded input patches (`in*kh*kw`, the weight matrix's column order) for a convolution.

    No activation is kept beyond the hook call, except the last input seen: layers fed the very same tensor the
    same way (q/k/v of one attention, to_k/to_v of a cross-attention) reuse its product instead of recomputing it.
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.grams: dict[str, torch.Tensor] = {}
        self._last: tuple[torch.Tensor, tuple, torch.Tensor] | None = None
        self._handles = []
        for name, module in modules.items():
            weight = weight_matrix(unwrap(module))
            self.grams[name] = torch.zeros(weight.shape[1], weight.shape[1], device=weight.device)
            base = unwrap(module)
            geometry = ((base.kernel_size, base.dilation, base.padding, base.stride)
                        if isinstance(base, nn.Conv2d) else ())
            self._handles.append(module.register_forward_pre_hook(
                lambda _module, args, name=name, geometry=geometry: self._record(name, args[0].detach(), geometry)))

    def _record(self, name: str, x: torch.Tensor, geometry: tuple) -> None:
        if self._last is None or self._last[0] is not x or self._last[1] != geometry:
            if geometry:
                patches = F.unfold(x.float(), *geometry)  # [B, in*kh*kw, positions]
                rows = patches.mT.reshape(-1, patches.shape[1])
            else:
                rows = x.reshape(-1, x.shape[-1]).float()
            self._last = (x, geometry, rows.mT @ rows)
        self.grams[name] += self._last[2]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._last = None


# ---- writing the result ------------------------------------------------------------------------------------


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
    if fmt not in OUTPUT_FORMATS:
        raise SpectralDiffusionError(f"unknown output format {fmt!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    check_output(out, overwrite)
    if fmt == "lora" and report.low_rank is None:
        raise SpectralDiffusionError(
            f"--format lora needs a method whose result is an exact sum of factors ({', '.join(LOW_RANK_METHODS)}); "
            f"{report.method} gives dense weight changes: write diffusers or single-file")
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
