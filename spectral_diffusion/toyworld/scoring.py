"""Scores of trained toy-world concepts, read by the judge from generated images: what the demo and the fusion
benchmark report.

- identity: the judge's mean probability of the concept, for the concept's own prompt on a training background;
- prompt fidelity: the judge's mean probability of a background the concept's photos never had, when asked for;
- regional success: two concepts in a left | right regional prompt (either region mode), the fraction of seeds in
  which the judge recognises (arg-max) each concept in its own half of the image.

Every score runs `n` seeds in one seeded batch (image i uses seed `seed + i`), so methods compare on equal noise.

API:
    concept_token(name) -> "<name>";  concept_prompt(name, background) -> str
    Sampling(steps, guidance, scheduler, seed, n).settings(prompt, size=None, regions=(), region_mode=...)
    score_concept(pipe, judge, name, sampling, new_background) -> ConceptScore
    score_regional(pipe, judge, left, right, sampling, background, mode) -> RegionalScore
    retention(fused, single) -> float
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from diffusers import StableDiffusionPipeline
from PIL import Image

from spectral_diffusion.generation import GenerationSettings, generate, native_size
from spectral_diffusion.regional import ConceptScope, Region
from spectral_diffusion.toyworld import concepts
from spectral_diffusion.toyworld.judge import LABELS, Judge

IDENTITY_BACKGROUND = concepts.TRAIN_BACKGROUNDS[0]
NEW_BACKGROUND = concepts.NEW_BACKGROUNDS[-1]


def concept_token(name: str) -> str:
    """The trigger word of toy concept `name`."""
    return f"<{name}>"


def concept_prompt(name: str, background: str) -> str:
    """The photos' caption template with the concept's token, e.g. "a photo of <striped_fish> fish on a gray ..."."""
    return concepts.concept_caption(name, background, concept_token(name))


@dataclass(frozen=True)
class Sampling:
    """How every scored image is drawn: `n` seeds per prompt, starting at `seed`."""

    steps: int = 20
    guidance: float = 5.0
    scheduler: str = "dpm++"
    seed: int = 1000
    n: int = 8

    def settings(self, prompt: str, size: tuple[int, int] | None = None, regions: Sequence[Region] = (),
                 region_mode: str = "attention") -> GenerationSettings:
        return GenerationSettings(prompt=prompt, steps=self.steps, guidance=self.guidance, scheduler=self.scheduler,
                                  seed=self.seed, n=self.n, size=size, regions=tuple(regions),
                                  region_mode=region_mode)


@dataclass
class ConceptScore:
    """One concept's scores on one model; `images` are the samples the scores were read from (own prompt first)."""

    concept: str
    identity: float
    fidelity: float
    new_background_identity: float
    images: list[Image.Image] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, float | str]:
        return {"concept": self.concept, "identity": self.identity, "fidelity": self.fidelity,
                "new_background_identity": self.new_background_identity}


@dataclass
class RegionalScore:
    """Two concepts side by side: success rate (both recognised in their halves) and each half's identity."""

    left: str
    right: str
    mode: str
    success: float
    left_identity: float
    right_identity: float
    images: list[Image.Image] = field(default_factory=list, repr=False)
    scoped: bool = False  # live concepts, each applied only in its own region

    def to_dict(self) -> dict[str, float | str | bool]:
        return {"left": self.left, "right": self.right, "mode": self.mode, "scoped": self.scoped,
                "success": self.success, "left_identity": self.left_identity, "right_identity": self.right_identity}


def score_concept(pipe: StableDiffusionPipeline, judge: Judge, name: str, sampling: Sampling,
                  new_background: str = NEW_BACKGROUND, model: str = "") -> ConceptScore:
    """Identity on the concept's own prompt (training background) and fidelity to `new_background`.

    `pipe` must know the concept's token (fused, or composed live); `model` only labels the PNG metadata.
    """
    label = {concept_token(name): 1.0}
    own = generate(pipe, sampling.settings(concept_prompt(name, IDENTITY_BACKGROUND)), model=model, concepts=label)
    new = generate(pipe, sampling.settings(concept_prompt(name, new_background)), model=model, concepts=label)
    return ConceptScore(name, judge.identity_score(own, name), judge.background_match(new, new_background),
                        judge.identity_score(new, name), own + new)


def halves(image: Image.Image) -> tuple[Image.Image, Image.Image]:
    """The left and right halves of an image."""
    w, h = image.size
    return image.crop((0, 0, w // 2, h)), image.crop((w - w // 2, 0, w, h))


def score_regional(pipe: StableDiffusionPipeline, judge: Judge, left: str, right: str, sampling: Sampling,
                   background: str = IDENTITY_BACKGROUND, mode: str = "latent", model: str = "",
                   scope: ConceptScope | None = None) -> RegionalScore:
    """Generate `left | right` with one regional prompt per half on a twice-as-wide canvas (each half is the
    model's native size, what the judge reads) in region mode `mode`, then judge each half. `scope`: live concepts
    applied per region (`Composer.scope`; latent mode)."""
    width, height = native_size(pipe)
    regions = (Region(concept_prompt(left, background), box=(0.0, 0.0, 0.5, 1.0)),
               Region(concept_prompt(right, background), box=(0.5, 0.0, 1.0, 1.0)))
    prompt = (f"a photo of {concept_token(left)} {concepts.get_concept(left).class_word} and "
              f"{concept_token(right)} {concepts.get_concept(right).class_word} on a {background} background")
    settings = sampling.settings(prompt, size=(2 * width, height), regions=regions, region_mode=mode)
    images = generate(pipe, settings, model=model, concepts={concept_token(left): 1.0, concept_token(right): 1.0},
                      scope=scope)
    split = [halves(image) for image in images]
    probs = {side: judge.predict([pair[k] for pair in split])["concept"] for k, side in enumerate(("left", "right"))}
    index = {"left": LABELS["concept"].index(left), "right": LABELS["concept"].index(right)}
    hit = {side: p.argmax(dim=1) == index[side] for side, p in probs.items()}
    return RegionalScore(left, right, mode, (hit["left"] & hit["right"]).float().mean().item(),
                         probs["left"][:, index["left"]].mean().item(), probs["right"][:, index["right"]].mean().item(),
                         images, scoped=scope is not None)


def retention(fused: float, single: float) -> float:
    """Fused identity as a fraction of the concept's own identity (NaN when it had none to keep)."""
    return fused / single if single > 0 else math.nan
