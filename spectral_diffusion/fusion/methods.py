"""The fusion methods: merge math on plain tensors, and the layer statistics gradient / closed-form fusion solve.

`spectral` (`fuse`'s default) adds `sum_i w_i dW_i` for Spectral Adapter concepts in disjoint SVD bands; the factors come from
each concept file (`Concept.delta_factors`), never from a recomputed SVD.

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
  ordinary prompts (the empty prompt, the class words, the captions without their tokens, the captions the concepts'
  locality terms held). Each concept then keeps its own mapping of its own token, other concepts' deltas are
  cancelled on it, and ordinary prompts map as in the base. Text encodings only (no image is sampled): seconds.
  Other layers get the exact sum.
- `gradient`: Mix-of-Show's gradient fusion `min_W sum_i ||W X_i - (W0 + w_i dW_i) X_i||^2`, with `X_i` the layer
  inputs recorded while concept `i`'s model encodes and samples its prompts. Solved per layer in closed form from
  Gram matrices accumulated by forward hooks (no activation is stored), with a small ridge towards `W0`:
  `W = W0 + (sum_i w_i dW_i G_i)(sum_i G_i + lambda I)^-1`, `G_i = X_i X_i^T`, `lambda = ridge * tr(sum G) / in`.
  The reference implementation runs LBFGS on stored activations for minutes per layer; this is one solve.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge
from torch import nn

from spectral_diffusion.adapters.inject import load_adapter, remove_adapters
from spectral_diffusion.adapters.layers import Factors, layer_generator, unwrap
from spectral_diffusion.adapters.targets import adaptable_layers, is_text_fed
from spectral_diffusion.bands import weight_matrix
from spectral_diffusion.concept_file import Concept, ConceptMeta
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.tokens import drop_token

METHODS = ("spectral", "closed-form", "mean", "sum", "ties", "dare", "gradient")
# What the CLI and the app fuse with unless told: the method that kept identity best at every N in the fusion
# benchmark (docs/results/fusion_quality.md), with or without a prior of captions. `fuse()` itself defaults to the
# exact sum, as diffusers' fuse_lora does.
RECOMMENDED_METHOD = "closed-form"
LOW_RANK_METHODS = ("spectral", "sum", "mean")  # exact sums of factors: also writable as one LoRA
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
        chol, info = torch.linalg.cholesky_ex(s)
        if info.item():
            raise SpectralDiffusionError(
                f"the recorded layer inputs span too few directions to solve for the weight at ridge {ridge:g}; "
                "give a larger --ridge (default 1e-4)")
        return torch.cholesky_solve(self.cross.double().mT, chol).mT.float()


def merged_delta(method: str, name: str, per_concept: Sequence[Factors | None], *, density: float = 0.5,
                 seed: int = 0) -> torch.Tensor:
    """The dense fp32 weight change of layer `name` under a non-gradient method, from each concept's weighted
    factors (None where a concept leaves the layer alone)."""
    present = [(i, f) for i, f in enumerate(per_concept) if f is not None]
    if method in LOW_RANK_METHODS:
        up, down = concat_factors([f for _, f in present])
        return up @ down
    dense = [up @ down for _, (up, down) in present]
    if method == "ties":
        return ties_merge(dense, density)
    if method == "dare":
        return dare_merge(dense, density, [layer_generator(seed, f"{name}#{i}") for i, _ in present])
    raise ValueError(f"{method} is not a closed-form merge")


def concat_factors(factors: Sequence[Factors]) -> Factors:
    """One factor pair holding every pair side by side: `sum_i up_i @ down_i = up @ down`."""
    return torch.cat([u for u, _ in factors], dim=1), torch.cat([d for _, d in factors], dim=0)



# ---- recording layer inputs (gradient and closed-form fusion) ------------------------------------------------


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
    guidance reads it), each class word in templates, every concept's captions without its token, and the ordinary
    captions its training's locality term held (`train --locality-captions`)."""
    prompts = {t.format(m.class_word).strip() for m in metas for t in ORDINARY_TEMPLATES}
    prompts |= {drop_token(c, m.token) for m in metas for c in m.training.get("captions", [])}
    prompts |= {c for m in metas for c in m.training.get("locality_captions", [])}
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
