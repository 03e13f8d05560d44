"""Live composition: several concept files on one loaded pipeline, with weights, without touching the base weights.

Each concept becomes one named adapter in the core's `AdapterLayer` wrappers, at scale = its weight, so the output is
`W x + sum_i w_i dW_i x`: what `fusion.fuse(..., method="spectral")` bakes into the weights, to float rounding.
Changing a weight is a `set_scale` on each wrapper (microseconds); adding or removing a concept rebuilds the live set
in one canonical order from the cached concept files (by path, size and modification time), so an image depends
only on the live set and weights, never on the calls before (it reproduces from its PNG metadata bit for bit).
By default (`merge=True`) the wrappers run one dense weight `W + sum_i w_i dW_i`, rebuilt from the untouched base
weight on the first step after a change (`AdapterLayer.merge_live`), so a step with N concepts costs a base step.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from diffusers import StableDiffusionPipeline

from spectral_diffusion.adapters.inject import load_adapter, remove_adapters
from spectral_diffusion.adapters.layers import AdapterLayer
from spectral_diffusion.concept_file import Concept, load_concept, read_meta
from spectral_diffusion.errors import check_number
from spectral_diffusion.fusion import add_tokens, check_concepts, weights_for
from spectral_diffusion.loras import pristine_fingerprint
from spectral_diffusion.tokens import resize_embeddings

# Concept weights beyond this only saturate the image (and overflow in fp16); negative ones subtract a concept.
MAX_WEIGHT = 100.0


def check_weight(weight: object, concept: str | Path) -> float:
    """A concept's weight as a float; NaN, infinities and weights beyond +-MAX_WEIGHT are refused in one line."""
    return check_number(weight, f"the weight of {Path(concept).name}", low=-MAX_WEIGHT, high=MAX_WEIGHT)


def concept_weights(concepts: Sequence[str | Path], weights: Sequence[float] | None = None) -> dict[Path, float]:
    """Concept files (absolute paths) with their weights, 1 each when None, for `Composer.set_concepts`; checked
    before any model loads: the number of weights, each weight (`check_weight`), then each file's metadata (a
    missing or foreign file)."""
    checked = {Path(c).expanduser().absolute(): check_weight(w, c)
               for c, w in zip(concepts, weights_for(len(concepts), weights), strict=True)}
    for concept in concepts:
        read_meta(concept)
    return checked


@dataclass(frozen=True)
class _Loaded:
    concept: Concept
    stamp: tuple[int, int]  # (size, mtime_ns) of the file when read
    adapter: str  # adapter name in the wrappers


@dataclass
class _Live:
    entry: _Loaded
    weight: float
    layers: list[AdapterLayer]  # the wrappers holding its adapter


class Composer:
    """Keeps a pipeline's live concept set equal to the last `set_concepts` call.

    New concepts' tokens are appended; removing a concept rebuilds the tokens from a pristine copy of the tokenizer,
    so its token really disappears (tokenizers cannot forget an added token) and the embedding matrix shrinks.
    `allow_overlap` lets spectral concepts that share SVD columns be composed (they interfere); default refuses.
    `merge=False` applies every concept as a per-step low-rank correction instead of a merged dense weight.
    `fingerprint`: that of `pipe` fresh from `BaseSpec.load` (`LoadedBase.fingerprint`), so it is not computed again.
    """

    def __init__(self, pipe: StableDiffusionPipeline, *, allow_overlap: bool = False, merge: bool = True,
                 fingerprint: str | None = None) -> None:
        self.pipe = pipe
        self.allow_overlap = allow_overlap
        self.merge = merge
        # concepts are checked against the base as loaded: LoRAs fused by `loras.set_loras` do not count
        self.fingerprint = fingerprint or pristine_fingerprint(pipe)
        self._tokenizer = copy.deepcopy(pipe.tokenizer)
        self._cache: dict[Path, _Loaded] = {}
        self._live: dict[Path, _Live] = {}
        self._count = 0

    @property
    def concepts(self) -> dict[Path, float]:
        """The live concepts (resolved paths) and their weights."""
        return {path: live.weight for path, live in self._live.items()}

    def set_concepts(self, concepts: Mapping[str | Path, float]) -> None:
        """Make exactly `concepts` (path -> weight) live. Every check runs before the pipeline changes."""
        wanted = {Path(p).expanduser().resolve(): check_weight(w, p) for p, w in concepts.items()}
        entries = {path: self._load(path) for path in wanted}
        removed = [p for p, live in self._live.items() if entries.get(p) is not live.entry]  # gone, or file changed
        if any(p not in self._live or p in removed for p in wanted):  # a subset of a checked set needs no check
            check_concepts([(e.concept, str(p)) for p, e in entries.items()], self.fingerprint, self._tokenizer,
                           check_bands=True, allow_overlap=self.allow_overlap)
        if removed or any(p not in self._live for p in wanted):
            self._rebuild(wanted, entries)
        for path, weight in wanted.items():
            if self._live[path].weight != weight:  # a scale is set, not accumulated: no float history
                for layer in self._live[path].layers:
                    layer.set_scale(self._live[path].entry.adapter, weight)
                self._live[path].weight = weight
        if not wanted:
            remove_adapters(self.pipe.unet, self.pipe.text_encoder)
            resize_embeddings(self.pipe.text_encoder, len(self._tokenizer))  # the plain base: no rows of old tokens

    def _rebuild(self, wanted: Mapping[Path, float], entries: Mapping[Path, _Loaded]) -> None:
        """Load the live set afresh in one order (by path): adapters are summed, and tokens added, in that order,
        so the same set and weights give bit-identical images whatever the earlier calls (PNG metadata reproduces
        them). A tokenizer cannot forget a token: tokens restart from the pristine copy."""
        for live in self._live.values():
            for layer in live.layers:
                layer.remove_adapter(live.entry.adapter)
        self._live = {}
        for path in sorted(wanted):
            entry = entries[path]
            wrappers = load_adapter(self.pipe.unet, self.pipe.text_encoder, entry.concept.meta.variant,
                                    entry.concept.layers, name=entry.adapter, scale=wanted[path])
            self._live[path] = _Live(entry, wanted[path], list(wrappers.values()))
            for layer in wrappers.values():
                layer.merge_live = self.merge
        self.pipe.tokenizer = copy.deepcopy(self._tokenizer)
        add_tokens(self.pipe, [entries[path].concept for path in sorted(wanted)])

    @contextmanager
    def scope(self, prompt: str) -> Iterator[None]:
        """Inside the block only the live concepts whose token is in `prompt` apply; the others are at scale 0.

        Latent-mode regional generation runs each region's pass in `scope(region prompt)`, so a concept draws only
        where its token is asked for (`generation.generate(..., scope=composer.scope)`). Layers holding a concept
        that is off take the live path meanwhile; their merged weight is kept for after the block, unchanged.
        """
        off = [live for live in self._live.values() if live.entry.concept.meta.token not in prompt]
        unmerged = {id(layer): layer for live in off for layer in live.layers}.values()
        for layer in unmerged:
            layer.merge_live = False
        for live in off:
            for layer in live.layers:
                layer.set_scale(live.entry.adapter, 0.0)
        try:
            yield
        finally:
            for live in off:
                for layer in live.layers:
                    layer.set_scale(live.entry.adapter, live.weight)
            for layer in unmerged:
                layer.merge_live = self.merge

    def clear(self) -> None:
        """Back to the plain base model."""
        self.set_concepts({})

    def _load(self, path: Path) -> _Loaded:
        """The cached concept at `path`, reread (as a new adapter) if the file changed since."""
        stat = path.stat() if path.is_file() else None
        stamp = (stat.st_size, stat.st_mtime_ns) if stat else (-1, -1)
        cached = self._cache.get(path)
        if cached is None or cached.stamp != stamp:
            self._count += 1
            cached = self._cache[path] = _Loaded(load_concept(path), stamp, f"concept{self._count}")
        return cached
