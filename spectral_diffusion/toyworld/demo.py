"""The end-to-end demo on the toy world: train three concepts in bands 0, 1, 2, fuse them, generate, judge.

It runs the product's whole path offline in minutes on a CPU (the trainer with the toy recipe, `fusion.fuse` with
the recipe's method, `generation.generate` with regional prompts) and puts numbers on the claim that matters: each
concept's identity with its own model versus inside the fused model, whether a fused concept still follows a prompt
its photos never showed, and two concepts side by side: in the fused model, and (latent region mode) live, each
applied only in its own region.

Output folder (re-running reuses the concept files already trained with the same recipe; `overwrite` retrains):

    photos/<name>/            the concept photos trained on (rendered by `concepts.write_concept_folder`)
    concepts/<name>.safetensors (+ .json sidecar)
    images/<kind>-<name>-<seed>.png    every scored image, A1111 `parameters` metadata included (kinds: single,
                              fused, regions (fused model), regions-live (live concepts scoped to their regions))
    grid.png                  labelled overview: photo, own model, fused, fused on a new background, regions
    scores.json               the printed scores

API:
    DEMO_CONCEPTS
    DemoConfig(out, base, concepts, steps, seeds, fusion, ...)
    run_demo(config, judge=None, log=print) -> DemoResult
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from spectral_diffusion.atomic import atomic_write
from spectral_diffusion.compose import Composer
from spectral_diffusion.concept_file import read_meta
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.fusion import fuse
from spectral_diffusion.generation import save_png
from spectral_diffusion.models import BaseSpec, LoadedBase
from spectral_diffusion.toyworld import concepts
from spectral_diffusion.toyworld.judge import Judge
from spectral_diffusion.toyworld.recipe import RECIPE
from spectral_diffusion.toyworld.scoring import (
    NEW_BACKGROUND,
    ConceptScore,
    RegionalScore,
    Sampling,
    concept_token,
    retention,
    score_concept,
    score_regional,
)
from spectral_diffusion.training.config import TrainConfig
from spectral_diffusion.training.trainer import locality_captions, locality_prompts, train

# Three concepts whose class words differ (fish, house, circle), so the regional pairs are easy to tell apart.
DEMO_CONCEPTS = ("striped_fish", "red_door_house", "bullseye")
# Training settings the demo checks before reusing a concept file from an earlier run.
RECIPE_KEYS = ("variant", "band", "rank", "targets", "steps", "batch_size", "lr_unet", "lr_text", "lr_emb", "seed",
               "num_vectors", "locality_weight", "locality_prompts", "locality_captions", "base_fingerprint")


@dataclass
class DemoConfig:
    """What the demo trains (the toy recipe, `recipe.RECIPE`) and how it samples. Concept `i` goes to band `i`."""

    out: Path = Path("demo-output")
    base: str = "toy"
    device: str | None = None
    concepts: Sequence[str] = DEMO_CONCEPTS
    steps: int = RECIPE.steps
    seeds: int = 8
    variant: str = "additive"
    fusion: str = RECIPE.fusion
    seed: int = 0
    sample_steps: int = 20
    guidance: float = 5.0
    new_background: str = NEW_BACKGROUND
    # latent: the toy base only ever drew one object per 64x64 image, so in cross-attention mode a 128x64 canvas
    # gets one object; window denoising gives each half its own native-size pass
    region_mode: str = "latent"
    overwrite: bool = False

    def check(self) -> None:
        if len(self.concepts) < 2:
            raise SpectralDiffusionError("the demo needs at least two concepts (it composes two in one image)")
        if len(set(self.concepts)) != len(self.concepts):
            raise SpectralDiffusionError(f"concepts must differ, got {', '.join(self.concepts)}")
        for name in self.concepts:
            concepts.get_concept(name)
        if self.new_background in concepts.TRAIN_BACKGROUNDS:
            raise SpectralDiffusionError(
                f"--new-background {self.new_background} is in the photos; choose {', '.join(concepts.NEW_BACKGROUNDS)}")
        if self.seeds < 1 or self.steps < 1:
            raise SpectralDiffusionError(f"steps and seeds must be >= 1, got {self.steps} and {self.seeds}")


@dataclass
class DemoResult:
    """Scores per concept with its own model (`single`) and in the fused model, regional pairs, files written."""

    single: dict[str, ConceptScore]
    fused: dict[str, ConceptScore]
    regional: list[RegionalScore]
    grid: Path
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "concepts": {name: {"single": self.single[name].to_dict(), "fused": self.fused[name].to_dict(),
                                "retention": retention(self.fused[name].identity, self.single[name].identity)}
                         for name in self.single},
            "regional": [r.to_dict() for r in self.regional],
            "seconds": self.seconds,
        }

    def table(self) -> str:
        """The scores as a plain-text table."""
        lines = [f"{'concept':<16} {'identity single':>15} {'identity fused':>14} {'retention':>9} "
                 f"{'fidelity single':>15} {'fidelity fused':>14}"]
        for name, single in self.single.items():
            fused = self.fused[name]
            lines.append(f"{name:<16} {single.identity:>15.2f} {fused.identity:>14.2f} "
                         f"{retention(fused.identity, single.identity):>9.2f} {single.fidelity:>15.2f} "
                         f"{fused.fidelity:>14.2f}")
        for r in self.regional:
            lines.append(f"regions {r.left} | {r.right} ({_model(r)}): both recognised in {r.success:.0%} of seeds "
                         f"(identity {r.left_identity:.2f} | {r.right_identity:.2f})")
        return "\n".join(lines)


def write_photos(names: Sequence[str], root: Path) -> dict[str, Path]:
    """The bundled concepts' photo folders under `root` (deterministic renders; existing folders are kept)."""
    folders = {}
    for name in names:
        folder = root / name
        if not any(folder.glob("*.png")):
            concepts.write_concept_folder(name, folder)
        folders[name] = folder
    return folders


def _short(value: object) -> object:
    """A setting as the refusal names it: a list of captions by its length."""
    return f"{len(value)} captions" if isinstance(value, list) and len(value) > 4 else value


def _reusable(path: Path, config: TrainConfig, band: int, fingerprint: str) -> bool:
    """True if `path` holds this concept trained with the same recipe; refuses one trained otherwise."""
    if not path.is_file() or config.overwrite:
        return False
    meta = read_meta(path)
    lr_unet, lr_text, lr_emb = config.learning_rates()
    wanted = {key: getattr(config, key, None) for key in RECIPE_KEYS}
    wanted.update(band=band, lr_unet=lr_unet, lr_text=lr_text, lr_emb=lr_emb, base_fingerprint=fingerprint,
                  locality_prompts=locality_prompts(config), locality_captions=locality_captions(config) or None)
    found = {key: meta.training.get(key) for key in RECIPE_KEYS}
    if found != wanted:
        changed = ", ".join(f"{k} {_short(found[k])} -> {_short(wanted[k])}" for k in RECIPE_KEYS
                            if found[k] != wanted[k])
        raise SpectralDiffusionError(f"{path} was trained with other settings ({changed}); pass --overwrite to retrain")
    return True


def train_concepts(config: DemoConfig, photos: dict[str, Path], base: LoadedBase,
                   log: Callable[[str], None]) -> dict[str, Path]:
    """Concept `i` of `config.concepts` trained in band `i` on the base (handed back unchanged), or reused from an
    earlier run."""
    paths = {}
    for band, name in enumerate(config.concepts):
        out = config.out / "concepts" / f"{name}.safetensors"
        train_config = RECIPE.train_config(name, photos[name], out, band=band, variant=config.variant,
                                           base=config.base, device=config.device, seed=config.seed,
                                           overwrite=config.overwrite, steps=config.steps)
        if _reusable(out, train_config, band, base.fingerprint):
            log(f"reusing {out}")
        else:
            start = time.perf_counter()
            train(train_config, base.pipe)
            log(f"trained {name} in band {band} ({config.steps} steps, {time.perf_counter() - start:.0f} s): {out}")
        paths[name] = out
    return paths


def save_scored_images(folder: Path, kind: str, scores: Sequence[ConceptScore | RegionalScore]) -> None:
    """Every image behind `scores` as `<kind>-<name>-<seed>.png` (name `left+right` for regional scores)."""
    for score in scores:
        name = score.concept if isinstance(score, ConceptScore) else f"{score.left}+{score.right}"
        for k, item in enumerate(score.images):
            variant = "" if isinstance(score, RegionalScore) or k < len(score.images) // 2 else "-new-background"
            save_png(folder / f"{kind}-{name}{variant}-{item.info['seed']}.png", item)


def labelled_grid(rows: Sequence[tuple[str, Sequence[tuple[Image.Image, str]]]], cell: int = 128) -> Image.Image:
    """Rows of images under a title line each; every image scaled to `cell` px high with its label below."""
    font = ImageFont.load_default(size=12)
    title_h, label_h, pad = 18, 16, 4
    scaled = [[(img.resize((img.width * cell // img.height, cell), Image.Resampling.NEAREST), label)
               for img, label in cells] for _, cells in rows]
    width = max(sum(img.width + pad for img, _ in cells) for cells in scaled) + pad
    height = sum(title_h + cell + label_h + pad for _ in rows) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = pad
    for (title, _), cells in zip(rows, scaled, strict=True):
        draw.text((pad, y), title, fill="black", font=font)
        y += title_h
        x = pad
        for img, label in cells:
            canvas.paste(img, (x, y))
            draw.text((x + 2, y + cell + 1), label, fill=(60, 60, 60), font=font)
            x += img.width + pad
        y += cell + label_h + pad
    return canvas


def _grid_rows(config: DemoConfig, photos: dict[str, Path], result: DemoResult, per_kind: int
               ) -> list[tuple[str, list[tuple[Image.Image, str]]]]:
    rows = []
    for name in config.concepts:
        single, fused = result.single[name], result.fused[name]
        half = len(fused.images) // 2
        with Image.open(sorted(photos[name].glob("*.png"))[0]) as photo:
            cells = [(photo.convert("RGB"), "a photo")]
        cells += [(g, f"own model #{g.info['seed']}") for g in single.images[:per_kind]]
        cells += [(g, f"fused #{g.info['seed']}") for g in fused.images[:per_kind]]
        cells += [(g, f"fused, {config.new_background}") for g in fused.images[half:half + per_kind]]
        rows.append((f"{concept_token(name)} ({concepts.get_concept(name).description}): identity "
                     f"{single.identity:.2f} alone, {fused.identity:.2f} fused", cells))
    for scoped in (False, True):
        scores = [r for r in result.regional if r.scoped == scoped]
        if scores:
            rows.append((f"two regional prompts (left | right), {_model(scores[0])}: both recognised in their halves "
                         "in", [(r.images[0], f"{_word(r.left)} | {_word(r.right)}: {r.success:.0%} of seeds")
                                for r in scores]))
    return rows


def _word(name: str) -> str:
    return concepts.get_concept(name).class_word


def _model(score: RegionalScore) -> str:
    if score.scoped:
        return f"live concepts, each only in its own region, {score.mode} mode"
    return f"fused model, {score.mode} mode"


def run_demo(config: DemoConfig, judge: Judge | None = None, log: Callable[[str], None] = print) -> DemoResult:
    """Train (or reuse), fuse, generate, judge; write the output folder; return the scores."""
    config.check()
    judge = judge or Judge.load()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    out = Path(config.out)
    photos = write_photos(config.concepts, out / "photos")
    base = BaseSpec(config.base, device=config.device).load()
    pipe = base.pipe
    paths = train_concepts(config, photos, base, log)
    timings["train"] = time.perf_counter() - start

    sampling = Sampling(steps=config.sample_steps, guidance=config.guidance, n=config.seeds)
    names = list(paths)
    pairs = [(names[i], names[(i + 1) % len(names)]) for i in range(len(names) if len(names) > 2 else 1)]
    composer = Composer(pipe, fingerprint=base.fingerprint)
    single = {}
    for name, path in paths.items():
        composer.set_concepts({path: 1.0})
        single[name] = score_concept(pipe, judge, name, sampling, config.new_background, model=config.base)
    regional = []
    if config.region_mode == "latent":  # all concepts live, each applied only in the region that names it
        composer.set_concepts(dict.fromkeys(paths.values(), 1.0))
        regional = [score_regional(pipe, judge, a, b, sampling, mode="latent", model=f"{config.base}+live",
                                   scope=composer.scope) for a, b in pairs]
    composer.clear()
    report = fuse(list(paths.values()), pipe, fingerprint=base.fingerprint, **RECIPE.fuse_options(config.fusion))
    log(report.summary())
    fused = {name: score_concept(pipe, judge, name, sampling, config.new_background, model=f"{config.base}+fused")
             for name in paths}
    regional = [score_regional(pipe, judge, a, b, sampling, mode=config.region_mode, model=f"{config.base}+fused")
                for a, b in pairs] + regional
    timings["generate_and_judge"] = time.perf_counter() - start - timings["train"]

    images = out / "images"
    save_scored_images(images, "single", list(single.values()))
    save_scored_images(images, "fused", list(fused.values()))
    save_scored_images(images, "regions", [r for r in regional if not r.scoped])
    save_scored_images(images, "regions-live", [r for r in regional if r.scoped])
    result = DemoResult(single, fused, regional, out / "grid.png", timings)
    grid = labelled_grid(_grid_rows(config, photos, result, per_kind=min(2, config.seeds)))
    atomic_write(result.grid, lambda tmp: grid.save(tmp, format="PNG"))
    timings["total"] = time.perf_counter() - start
    atomic_write(out / "scores.json", lambda tmp: tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n"))
    return result
