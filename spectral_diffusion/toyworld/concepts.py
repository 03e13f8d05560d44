"""Held-out concepts: distinctive composite objects the toy model never saw in pretraining.

Each concept has a fixed identity (its colours and pattern never change) and a class word that is one of the base
world's shapes (`render.SHAPES`), so pretraining gave the model a prior for the class ("fish", "circle", ...) but
never for the concept. Pretraining draws `render` scenes only, plain and patterned, minus each concept's look-alike
(`is_lookalike`: the patterned scene closest to it, e.g. a red and white striped heart for `candy_heart`), so a
concept is a new combination of what the base can draw, never a scene it saw.

Concept photo folders (`concepts/toyworld/<name>/`, written by `write_concept_folder`) use only the
`TRAIN_BACKGROUNDS`; the other backgrounds stay new, to test prompt fidelity ("<tok> fish on a dotted background").

API:
    CONCEPTS: dict[name, ConceptDef]        # name, class_word, description, lookalike
    is_lookalike(spec) -> bool              # a pretraining scene too close to a concept: never drawn there
    TRAIN_BACKGROUNDS, NEW_BACKGROUNDS
    render_concept(name, rng, background=None, size=None, position=None) -> PIL.Image (64x64)
    write_concept_folder(name, out_dir, seed=0, count=8) -> list[Path]   # PNGs + `.txt` captions with `{token}`
    concept_caption(name, background, token="{token}") -> str
    write_all_concepts(root, seed=0, count=8) -> list[Path]               # every folder + README.md
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.toyworld import render

TRAIN_BACKGROUNDS = ("gray", "sky", "brown")
NEW_BACKGROUNDS = tuple(b for b in render.BACKGROUNDS if b not in TRAIN_BACKGROUNDS)
CONCEPT_SIZES = ("medium", "large")  # small objects are too few pixels to show a pattern

RGB = tuple[int, int, int]
Painter = Callable[[Image.Image, float, float, float], None]


def _patterned(shape: str, pattern: Callable[[ImageDraw.ImageDraw, float, float, float], None],
               base: RGB) -> Painter:
    """Paint `shape` in `base`, overlaid by `pattern` (drawn freely, then clipped to the shape's silhouette)."""

    def paint(canvas: Image.Image, cx: float, cy: float, r: float) -> None:
        layer = Image.new("RGB", canvas.size, base)
        pattern(ImageDraw.Draw(layer), cx, cy, r)
        canvas.paste(layer, mask=render.silhouette(shape, cx, cy, r))

    return paint


def _vertical_bands(colours: list[RGB], x0: float, x1: float) -> Callable[[ImageDraw.ImageDraw, float, float,
                                                                          float], None]:
    """Equal vertical bands between fractions x0..x1 of the bounding box width."""

    def pattern(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
        left, width = cx - r + 2 * r * x0, 2 * r * (x1 - x0) / len(colours)
        for k, colour in enumerate(colours):
            draw.rectangle((left + k * width, cy - r, left + (k + 1) * width, cy + r), fill=colour)

    return pattern


def _horizontal_stripes(colour: RGB, period: float) -> Callable[[ImageDraw.ImageDraw, float, float, float], None]:
    def pattern(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
        step = 2 * r * period
        y = cy - r
        while y < cy + r:
            draw.rectangle((cx - r, y, cx + r, y + step / 2), fill=colour)
            y += step

    return pattern


def _checkers(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
    cell = 2 * r / 4
    for i in range(4):
        for j in range(4):
            if (i + j) % 2:
                x, y = cx - r + i * cell, cy - r + j * cell
                draw.rectangle((x, y, x + cell, y + cell), fill=(20, 20, 20))


def _clownfish_stripes(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
    white = (250, 250, 250)
    for x in (-0.1, 0.45):
        draw.rectangle((cx + (x - 0.1) * r, cy - r, cx + (x + 0.1) * r, cy + r), fill=white)
    draw.ellipse((cx + 0.68 * r, cy - 0.2 * r, cx + 0.82 * r, cy - 0.06 * r), fill=(20, 20, 20))


def _spots(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
    s = 0.17 * r
    for dx, dy in ((0, -0.5), (-0.48, -0.12), (0.48, -0.12), (-0.3, 0.45), (0.3, 0.45), (0, 0.05)):
        x, y = cx + dx * r, cy + dy * r
        draw.ellipse((x - s, y - s, x + s, y + s), fill=(250, 220, 20))


def _swiss(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
    a, b = 0.5 * r, 0.16 * r
    draw.rectangle((cx - a, cy - b, cx + a, cy + b), fill=(250, 250, 250))
    draw.rectangle((cx - b, cy - a, cx + b, cy + a), fill=(250, 250, 250))


def _split(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
    draw.rectangle((cx - r * 1.1, cy + 0.15 * r, cx + r * 1.1, cy + r * 1.2), fill=(255, 140, 0))


def _smiley(canvas: Image.Image, cx: float, cy: float, r: float) -> None:
    draw = ImageDraw.Draw(canvas)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(250, 220, 20))
    e = 0.14 * r
    for dx in (-0.35, 0.35):
        draw.ellipse((cx + dx * r - e, cy - 0.3 * r - e, cx + dx * r + e, cy - 0.3 * r + e), fill=(20, 20, 20))
    draw.arc((cx - 0.55 * r, cy - 0.45 * r, cx + 0.55 * r, cy + 0.6 * r), 20, 160, fill=(20, 20, 20),
             width=max(2, round(0.12 * r)))


def _bullseye(canvas: Image.Image, cx: float, cy: float, r: float) -> None:
    draw = ImageDraw.Draw(canvas)
    for k, colour in enumerate(((220, 30, 30), (250, 250, 250)) * 2 + ((220, 30, 30),)):
        rk = r * (1 - k * 0.19)
        draw.ellipse((cx - rk, cy - rk, cx + rk, cy + rk), fill=colour)


def _house(canvas: Image.Image, cx: float, cy: float, r: float) -> None:
    draw = ImageDraw.Draw(canvas)
    walls, roof = render.shape_parts("house", cx, cy, r)
    draw.polygon(walls[1], fill=(250, 220, 20))
    draw.polygon(roof[1], fill=(30, 70, 220))
    render.draw_door(draw, cx, cy, r, (220, 30, 30))
    draw.rectangle((cx + 0.3 * r, cy + 0.1 * r, cx + 0.55 * r, cy + 0.35 * r), fill=(250, 250, 250))


def _nut(canvas: Image.Image, cx: float, cy: float, r: float) -> None:
    background = canvas.copy()
    draw = ImageDraw.Draw(canvas)
    draw.polygon(render.regular_polygon(cx, cy, r, 6, phase=0.0), fill=(60, 60, 70))
    draw.polygon(render.regular_polygon(cx, cy, r * 0.85, 6, phase=0.0), fill=(200, 200, 210))
    hole = Image.new("L", canvas.size, 0)
    h = 0.38 * r
    ImageDraw.Draw(hole).ellipse((cx - h, cy - h, cx + h, cy + h), fill=255)
    canvas.paste(background, mask=hole)  # the background shows through the hole


@dataclass(frozen=True)
class ConceptDef:
    name: str
    class_word: str
    description: str
    paint: Painter
    lookalike: tuple[str, frozenset[str]] | None = None  # (render pattern, its colours) nearest the concept


_RED, _WHITE, _GREEN, _PURPLE, _BLUE = (220, 30, 30), (250, 250, 250), (30, 170, 50), (140, 50, 190), (30, 70, 220)
CONCEPTS: dict[str, ConceptDef] = {c.name: c for c in (
    ConceptDef("striped_fish", "fish", "orange fish with two white bands and a black eye",
               _patterned("fish", _clownfish_stripes, (255, 140, 0)), ("striped", frozenset({"orange", "white"}))),
    ConceptDef("red_door_house", "house", "yellow house, blue roof, red door, white window", _house,
               ("two-tone", frozenset({"blue", "yellow"}))),
    ConceptDef("checkered_disc", "circle", "black and white checkerboard disc",
               _patterned("circle", _checkers, _WHITE), ("checkered", frozenset({"white", "black"}))),
    ConceptDef("smiley_face", "circle", "yellow disc with black eyes and a smile", _smiley),
    ConceptDef("bullseye", "circle", "concentric red and white rings", _bullseye,
               ("striped", frozenset({"red", "white"}))),
    ConceptDef("tricolour_flag", "square", "square of green, white and red vertical bands",
               _patterned("square", _vertical_bands([_GREEN, _WHITE, _RED], 0.11, 0.89), _GREEN),
               ("tricolour", frozenset({"green", "white", "red"}))),
    ConceptDef("swiss_cross", "square", "red square with a white cross", _patterned("square", _swiss, _RED)),
    ConceptDef("spotted_star", "star", "purple star with yellow spots", _patterned("star", _spots, _PURPLE),
               ("spotted", frozenset({"purple", "yellow"}))),
    ConceptDef("split_triangle", "triangle", "triangle, blue above and orange below",
               _patterned("triangle", _split, _BLUE), ("two-tone", frozenset({"blue", "orange"}))),
    ConceptDef("hex_nut", "hexagon", "silver hexagon nut with a dark rim and a hole", _nut),
    ConceptDef("candy_heart", "heart", "heart with red and white horizontal stripes",
               _patterned("heart", _horizontal_stripes(_WHITE, 0.3), _RED), ("striped", frozenset({"red", "white"}))),
)}


def is_lookalike(spec: render.SceneSpec) -> bool:
    """True for a patterned scene of some concept's class word, pattern and colours (in any order; with a door or
    without)."""
    return any(c.lookalike == (spec.pattern, spec.colours) and c.class_word == spec.shape for c in CONCEPTS.values())


def get_concept(name: str) -> ConceptDef:
    if name not in CONCEPTS:
        raise SpectralDiffusionError(f"unknown toy concept {name!r}; choose from {', '.join(CONCEPTS)}")
    return CONCEPTS[name]


def render_concept(name: str, rng: random.Random, background: str | None = None, size: str | None = None,
                   position: str | None = None) -> Image.Image:
    """A 64x64 photo of concept `name`; unspecified background / size / position are drawn from `rng`."""
    concept = get_concept(name)
    background = background or rng.choice(render.BACKGROUNDS)
    size = size or rng.choice(CONCEPT_SIZES)
    position = position or rng.choice(tuple(render.POSITIONS))
    x, y = render.place(rng, size, position)
    canvas = render.draw_background(background)
    concept.paint(canvas, x * render.CANVAS, y * render.CANVAS, render.SIZES[size] * render.CANVAS)
    return render.finish(canvas)


def concept_caption(name: str, background: str, token: str = "{token}") -> str:
    """"a photo of {token} fish on a gray background": the trainer substitutes the concept token."""
    return f"a photo of {token} {get_concept(name).class_word} on a {background} background"


def write_concept_folder(name: str, out_dir: str | Path, seed: int = 0, count: int = 8) -> list[Path]:
    """Write `count` seeded photos (`00.png`...) with `.txt` captions, cycling through `TRAIN_BACKGROUNDS`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{name}-{seed}")
    paths = []
    for k in range(count):
        background = TRAIN_BACKGROUNDS[k % len(TRAIN_BACKGROUNDS)]
        image = render_concept(name, rng, background=background)
        path = out / f"{k:02d}.png"
        image.save(path)
        path.with_suffix(".txt").write_text(concept_caption(name, background) + "\n")
        paths.append(path)
    return paths


def write_all_concepts(root: str | Path, seed: int = 0, count: int = 8) -> list[Path]:
    """Write every concept's folder under `root`, plus a README.md listing them; returns the folders."""
    root = Path(root)
    folders = []
    for name in CONCEPTS:
        write_concept_folder(name, root / name, seed=seed, count=count)
        folders.append(root / name)
    rows = "\n".join(f"| `{c.name}` | {c.class_word} | {c.description} |" for c in CONCEPTS.values())
    (root / "README.md").write_text(
        "# Toy-world concepts\n\n"
        "Held-out objects the bundled toy model never saw in pretraining, each with a fixed identity and a class\n"
        "word from its vocabulary. Every folder holds seeded 64x64 photos on the training backgrounds\n"
        f"({', '.join(TRAIN_BACKGROUNDS)}; the others, {', '.join(NEW_BACKGROUNDS)}, stay new for prompt-fidelity "
        "tests)\nand `.txt` captions in which `{token}` stands for the concept token.\n"
        "Regenerate with `spectral-diffusion toyworld render-concepts`.\n\n"
        "| folder | class word | looks like |\n| --- | --- | --- |\n" + rows + "\n")
    return folders
