"""Concepts on a loaded diffusers pipeline, in diffusers' words: the verbs beside its `load_lora_weights`,
`set_adapters`, `fuse_lora` and `unfuse_lora`, and the prompt tags `<lora:NAME:W>` / `<concept:NAME:W>`.

    load_concept_weights(pipe, "fishA")       # concepts/fishA.safetensors (or any path), live at weight 1
    set_concept_weights(pipe, {"fishA": 0.8})  # a scale on each layer, nothing reloaded (as set_adapters)
    get_concept_weights(pipe)                  # {"fishA": 0.8}
    fuse_concepts(pipe)                        # written into the weights, as `fuse --method spectral` writes them
    unfuse_concepts(pipe)                      # the weights from before, exactly; the concepts live again
    unload_concept_weights(pipe)               # the plain base model (or name the concepts to unload)

They are functions taking the pipeline, not methods of a subclass, so they work on any `StableDiffusionPipeline`
however it was loaded (`models.load_base`, diffusers' `from_pretrained`). Each pipeline gets one `compose.Composer`,
kept on the pipeline: the engine for live concepts (one adapter per concept, `W x + sum_i w_i dW_i x`, checked
against the base they were trained on; the CLI and the app drive their own). Fusing hands the live set to
`fusion.fuse(..., "spectral")`, the one merge path. A concept is named by its file's stem; the loaded ones are
kept in one order, by path, whatever the order of the calls, so an image depends only on the set and its weights.
diffusers' own LoRA calls work beside all this in either order (the concepts' layers sit inside PEFT's;
`adapters.layers.AdapterLayer`), and so do LoRA files fused by `loras.set_loras`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from diffusers import StableDiffusionPipeline

from spectral_diffusion.adapters.inject import adapter_layers
from spectral_diffusion.adapters.layers import unwrap
from spectral_diffusion.compose import Composer, check_weight
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.fusion import FusionReport, fuse
from spectral_diffusion.loras import check_lora, fused_loras, parse_weight, set_loras

# The folder a concept name is looked up in unless told otherwise: the web app's default concepts folder.
CONCEPTS_DIR = "concepts"
# A1111's `<lora:NAME:W>`, and `<concept:NAME:W>` for concept files: NAME, then an optional weight (default 1).
PROMPT_TAG = re.compile(r"<(lora|concept):([^:>]+)(?::([^:>]*))?>")
_KINDS = {"lora": "LoRA", "concept": "concept"}


@dataclass
class _Fused:
    weights: dict[Path, float]  # the live set that was fused, restored by unfuse
    originals: list[tuple[torch.Tensor, torch.Tensor]]  # (weight, its value before fusing)


@dataclass
class _Concepts:
    composer: Composer
    fused: _Fused | None = None


# The pipeline carries its concepts' state itself, as diffusers' LoRA mixins keep theirs (a table keyed weakly by
# the pipeline would keep it alive: the composer refers to it).
_STATE = "_spectral_diffusion_concepts"


def _state(pipe: StableDiffusionPipeline) -> _Concepts:
    if getattr(pipe, _STATE, None) is None:
        setattr(pipe, _STATE, _Concepts(Composer(pipe)))
    return getattr(pipe, _STATE)


def _live(pipe: StableDiffusionPipeline, doing: str) -> Composer:
    """The pipeline's composer, refused while its concepts are fused (their weights are then in the base)."""
    state = _state(pipe)
    if state.fused is not None:
        raise SpectralDiffusionError(f"cannot {doing} while the concepts are fused; call unfuse_concepts(pipe) first")
    return state.composer


def _in_folder(name: str, folder: str | Path, what: str) -> Path:
    """NAME or NAME.safetensors in `folder` (A1111's rule for `<lora:NAME>`); names that lead outside are refused."""
    file = Path(folder) / (name if name.endswith(".safetensors") else f"{name}.safetensors")
    if not file.resolve().is_relative_to(Path(folder).resolve()):
        raise SpectralDiffusionError(f"{what} name {name!r} leads outside {folder}")
    return file


def concept_path(concept: str | Path, concepts_dir: str | Path = CONCEPTS_DIR) -> Path:
    """The resolved file of `concept`: a path to a concept file, or a name (NAME.safetensors in `concepts_dir`)."""
    path = Path(concept).expanduser()
    if not path.is_file():
        path = _in_folder(str(concept), concepts_dir, "concept")
        if not path.is_file():
            raise SpectralDiffusionError(f"no concept file {concept} (nor {path.name} in {concepts_dir})")
    return path.resolve()


def _loaded_path(composer: Composer, concept: str | Path) -> Path:
    """The live concept that `concept` (its name or its path) names."""
    for path in composer.concepts:
        if str(concept) == path.stem or Path(concept).expanduser().resolve() == path:
            return path
    loaded = ", ".join(p.stem for p in composer.concepts) or "none"
    raise SpectralDiffusionError(f"concept {concept} is not loaded (loaded: {loaded})")


def load_concept_weights(pipe: StableDiffusionPipeline, concept: str | Path, weight: float = 1.0, *,
                         concepts_dir: str | Path = CONCEPTS_DIR) -> str:
    """Apply a concept file live on `pipe` at `weight`, beside those already loaded; return its name (file stem).

    `concept` is a path, or a name looked up in `concepts_dir`. Loading a loaded concept again sets its weight.
    The file is checked (its base model, token, band) before the pipeline changes.
    """
    composer = _live(pipe, "load concepts")
    path = concept_path(concept, concepts_dir)
    twin = next((p for p in composer.concepts if p.stem == path.stem and p != path), None)
    if twin is not None:
        raise SpectralDiffusionError(f"a concept named {path.stem} is already loaded, from {twin}; unload it first")
    composer.set_concepts({**composer.concepts, path: weight})
    return path.stem


def set_concept_weights(pipe: StableDiffusionPipeline, weights: Mapping[str | Path, float]) -> None:
    """Set the weights of loaded concepts (by name or path); the others keep theirs."""
    composer = _live(pipe, "set concept weights")
    changed = {_loaded_path(composer, concept): check_weight(w, concept) for concept, w in weights.items()}
    composer.set_concepts({**composer.concepts, **changed})


def get_concept_weights(pipe: StableDiffusionPipeline) -> dict[str, float]:
    """The loaded concepts by name, with their weights (fused or live)."""
    state = getattr(pipe, _STATE, None)
    if state is None:
        return {}
    concepts = state.fused.weights if state.fused else state.composer.concepts
    return {path.stem: weight for path, weight in concepts.items()}


def unload_concept_weights(pipe: StableDiffusionPipeline, *concepts: str | Path) -> None:
    """Take the named concepts (names or paths; none: all of them) off `pipe`, tokens included."""
    composer = _live(pipe, "unload concepts")
    gone = {_loaded_path(composer, concept) for concept in concepts} if concepts else set(composer.concepts)
    composer.set_concepts({p: w for p, w in composer.concepts.items() if p not in gone})


def fuse_concepts(pipe: StableDiffusionPipeline) -> FusionReport:
    """Write the loaded concepts into `pipe`'s weights at their weights: what `fusion.fuse(files, base, "spectral",
    weights)` writes (the report is its report; `fusion.save_fused` saves the model). `unfuse_concepts` undoes it.

    LoRAs fused by `loras.set_loras` come off first and go back on top, so they stay where they were.
    """
    state = _state(pipe)
    if state.fused is not None:
        raise SpectralDiffusionError("the concepts are already fused (unfuse_concepts(pipe) undoes it)")
    composer = state.composer
    live = composer.concepts
    if not live:
        raise SpectralDiffusionError("no concepts are loaded: load_concept_weights(pipe, ...) first")
    layers = [unwrap(layer) for layer in adapter_layers(pipe.unet, pipe.text_encoder).values()]
    loras = fused_loras(pipe)
    composer.clear()
    if loras:
        set_loras(pipe, {})
    originals = [(layer.weight, layer.weight.detach().clone()) for layer in layers]
    try:
        report = fuse(list(live), pipe, "spectral", list(live.values()), allow_overlap=composer.allow_overlap)
    except BaseException:
        _restore(pipe, composer, originals, live, loras)
        raise
    state.fused = _Fused(live, originals)
    if loras:
        set_loras(pipe, loras)
    return report


def unfuse_concepts(pipe: StableDiffusionPipeline) -> None:
    """Put back the weights `fuse_concepts` changed, bit for bit, and apply its concepts live again (a LoRA that
    diffusers' `fuse_lora` wrote into the same weights in between goes too; `loras.set_loras` ones stay)."""
    state = _state(pipe)
    if state.fused is None:
        raise SpectralDiffusionError("no concepts are fused: fuse_concepts(pipe) first")
    fused, state.fused = state.fused, None
    loras = fused_loras(pipe)
    if loras:
        set_loras(pipe, {})
    _restore(pipe, state.composer, fused.originals, fused.weights, loras)


def _restore(pipe: StableDiffusionPipeline, composer: Composer, originals: list[tuple[torch.Tensor, torch.Tensor]],
             live: Mapping[Path, float], loras: Mapping[Path, float]) -> None:
    """The state before fusing: base weights, live concepts (tokens from the pristine tokenizer), then the LoRAs."""
    with torch.no_grad():
        for weight, original in originals:
            weight.copy_(original)
    composer.set_concepts(live)
    if loras:
        set_loras(pipe, loras)


class PromptTags(NamedTuple):
    """A prompt without its tags, and what the tags name: LoRA files (resolved, as `loras.check_lora` gives them)
    and concept files (absolute, named as in the folder: the metadata records that name) with their weights."""

    prompt: str
    loras: dict[Path, float]
    concepts: dict[Path, float]


def prompt_tags(prompt: str, *, lora_dir: str | Path, concepts_dir: str | Path = CONCEPTS_DIR) -> PromptTags:
    """Read `<lora:NAME:W>` (NAME.safetensors in `lora_dir`) and `<concept:NAME:W>` (in `concepts_dir`) out of
    `prompt`; W defaults to 1. Files and weights are checked, a file named twice is refused, and the tags are removed
    with the spaces around them, so the model sees the prompt without them."""
    found: dict[str, dict[Path, float]] = {"lora": {}, "concept": {}}
    for match in PROMPT_TAG.finditer(prompt):
        kind, name, weight = match[1], match[2].strip(), match[3]
        folder = lora_dir if kind == "lora" else concepts_dir
        file = _in_folder(name, folder, _KINDS[kind])
        if not file.is_file():
            raise SpectralDiffusionError(f"{match[0]}: no {_KINDS[kind]} {file.name} in {folder}")
        value = 1.0 if weight is None or not weight.strip() else parse_weight(weight, match[0])
        path, value = check_lora(file, value) if kind == "lora" else (file.absolute(), check_weight(value, file))
        if path in found[kind]:
            raise SpectralDiffusionError(f"{_KINDS[kind]} {name} is named twice in the prompt")
        found[kind][path] = value
    if found["lora"] or found["concept"]:
        text = " ".join(PROMPT_TAG.sub(" ", prompt).split())
        prompt = re.sub(r"\s+([,.;])", r"\1", text).strip(" ,")
    return PromptTags(prompt, found["lora"], found["concept"])


def merge_weights(what: str, *sets: Mapping[Path, float]) -> dict[Path, float]:
    """One set of files -> weights from several (`--lora` and the prompt's tags, say); a file in two is refused."""
    merged: dict[Path, float] = {}
    for weights in sets:
        for path, weight in weights.items():
            if path in merged:
                raise SpectralDiffusionError(f"{what} {path.name} is given twice")
            merged[path] = weight
    return merged
