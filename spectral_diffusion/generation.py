"""Generation: seeded sampling with a named scheduler, optional regional prompts, PNGs with A1111 metadata.

`generate` returns plain PIL images, as a diffusers pipeline does; each carries its metadata where PIL keeps a
PNG's text chunks, `image.info["parameters"]`, and the seed that reproduces it alone, `image.info["seed"]`, so
`save_images` / `save_png` (and PIL itself, reading a saved PNG back) find them there.

Image `i` of a run with seed `S` is drawn with its own generator seeded `S + i` (as A1111 does), so any single image
can be reproduced alone from the seed written in its PNG. The `parameters` text chunk uses A1111's layout so the
images read back in A1111, ComfyUI and civitai tools:

    <prompt>
    Negative prompt: <negative>
    Steps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1, Size: 64x64, Model: toy, Concepts: "<dogA>: 1",
    Loras: "style.safetensors: 0.8"
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from spectral_diffusion.atomic import atomic_write, check_writable
from spectral_diffusion.errors import SpectralDiffusionError, check_number
from spectral_diffusion.regional import (
    ConceptScope,
    Region,
    check_region_mode,
    fitting_canvas,
    regional_prompting,
    resolve_region_mode,
)
from spectral_diffusion.tokens import canonical_prompt

# Seeds are A1111's 32-bit ones (the app's and the CLI's rule alike); -1 asks for a random seed (`resolve_seed`).
MAX_SEED = 2**32 - 1
MAX_GUIDANCE = 100.0
# The largest canvas `generate` draws unless told otherwise (1024x1024, twice SD 1.5's native side): a typo such as
# 100000x16 is refused in one line instead of running for hours or running out of memory.
MAX_PIXELS = 1024 * 1024

# CLI name -> (diffusers class, config overrides, A1111 sampler name).
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict, str]] = {
    "ddim": (DDIMScheduler, {}, "DDIM"),
    "euler": (EulerDiscreteScheduler, {}, "Euler"),
    "euler_a": (EulerAncestralDiscreteScheduler, {}, "Euler a"),
    "heun": (HeunDiscreteScheduler, {}, "Heun"),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}, "DPM++ 2M"),
    "dpm++_karras": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
                     "DPM++ 2M Karras"),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}, "PLMS"),
    "unipc": (UniPCMultistepScheduler, {}, "UniPC"),
}


def make_scheduler(name: str, config: Mapping) -> SchedulerMixin:
    """A scheduler of kind `name` built from a pipeline's scheduler config (betas, prediction type, ...)."""
    if name not in SCHEDULERS:
        raise SpectralDiffusionError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls, overrides, _ = SCHEDULERS[name]
    return cls.from_config(config, **overrides)


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides an image besides the model.

    `size` is (width, height); None: the model's native size, or with regions the smallest canvas on which each
    spans the native size (`regional.fitting_canvas`). `region_mode` `auto` picks `latent` or `attention` for the
    regions on that canvas (`regional.resolve_region_mode`). `resolve_settings` decides both for a model.
    """

    prompt: str
    negative: str = ""
    steps: int = 20
    guidance: float = 7.0
    scheduler: str = "dpm++"
    seed: int = 0
    size: tuple[int, int] | None = None
    n: int = 1
    regions: Sequence[Region] = field(default_factory=tuple)
    region_mode: str = "auto"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise SpectralDiffusionError(f"steps must be >= 1, got {self.steps}")
        if self.n < 1:
            raise SpectralDiffusionError(f"the number of images must be >= 1, got {self.n}")
        object.__setattr__(self, "guidance", check_number(self.guidance, "guidance scale", low=0, high=MAX_GUIDANCE))
        if not 0 <= self.seed <= MAX_SEED:
            raise SpectralDiffusionError(f"seed must be between 0 and {MAX_SEED} (or -1 for a random seed), "
                                         f"got {self.seed}")
        if self.scheduler not in SCHEDULERS:
            raise SpectralDiffusionError(
                f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        check_region_mode(self.region_mode)

    def check_size(self, max_pixels: int = MAX_PIXELS) -> None:
        """What can be refused of the canvas before a model loads: a limit below one pixel, a given size over it
        (`resolve_settings` checks the rest once the model says its native size)."""
        _check_limit(max_pixels)
        if self.size is not None:
            check_canvas(*self.size, max_pixels)


def native_size(pipe: StableDiffusionPipeline) -> tuple[int, int]:
    """(width, height) the UNet was trained at: its sample size times the VAE's downsampling."""
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return side, side


def size_multiple(pipe: StableDiffusionPipeline) -> int:
    """Image sides must be multiples of the VAE's downsampling and of 8 (diffusers checks the latter itself)."""
    return math.lcm(8, pipe.vae_scale_factor)


def resolve_seed(seed: int | None) -> int:
    """A1111's convention, shared by the CLI and the app: -1 (or None) draws a fresh random seed; others are kept.

    Any other negative seed is left for `GenerationSettings` to refuse.
    """
    return random.SystemRandom().randint(0, MAX_SEED) if seed is None or seed == -1 else seed


def check_canvas(width: int, height: int, max_pixels: int = MAX_PIXELS, why: str = "") -> None:
    """Refuse a canvas of more than `max_pixels` pixels; `why` says where the size came from, if not the user."""
    _check_limit(max_pixels)
    if width * height > max_pixels:
        raise SpectralDiffusionError(
            f"size {width}x{height}{why} is {width * height} pixels, over the limit of {max_pixels} "
            f"(raise it with --max-pixels if this machine can draw that much)")


def _check_limit(max_pixels: int) -> None:
    if max_pixels < 1:
        raise SpectralDiffusionError(f"--max-pixels must be >= 1, got {max_pixels}")


def check_output_dir(path: str | Path) -> Path:
    """`path` as a folder that exists or is made now, and takes files: refused when it, or a folder above it, is a
    file, or when it cannot be written."""
    check_writable(path)
    return Path(path)


def parse_size(text: str) -> tuple[int, int]:
    """`"512x768"` -> (512, 768) as (width, height)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise SpectralDiffusionError(f"cannot parse size {text!r}; expected WIDTHxHEIGHT such as 512x512")
    return int(match[1]), int(match[2])


def resolve_settings(pipe: StableDiffusionPipeline, settings: GenerationSettings,
                     max_pixels: int = MAX_PIXELS) -> GenerationSettings:
    """`settings` with what it leaves to the model decided: the canvas when `size` is None, and region mode `auto`.

    The canvas is checked: sides positive multiples of `size_multiple`, at most `max_pixels` pixels. What this
    returns is what the images' metadata records, so they reproduce from it.
    """
    native = native_size(pipe)
    step = size_multiple(pipe)
    width, height = settings.size or fitting_canvas(settings.regions, native, step)
    if width % step or height % step or width <= 0 or height <= 0:
        raise SpectralDiffusionError(f"size {width}x{height} must be positive multiples of {step} for this model")
    fitted = settings.size is None and bool(settings.regions)
    check_canvas(width, height, max_pixels, why=f" (the smallest canvas on which every region spans the model's "
                                                f"native {native[0]}x{native[1]})" if fitted else "")
    mode = resolve_region_mode(settings.region_mode, settings.regions, (width, height), native)
    return replace(settings, size=(width, height), region_mode=mode)


def generate(pipe: StableDiffusionPipeline, settings: GenerationSettings, *, model: str = "",
             concepts: Mapping[str, float] | None = None, scope: ConceptScope | None = None,
             max_pixels: int = MAX_PIXELS, loras: Mapping[str, float] | None = None) -> list[Image.Image]:
    """Sample `settings.n` PIL images, each with `info["parameters"]` (A1111's text) and `info["seed"]`; `model`,
    `concepts` and `loras` (label -> weight) only go into that metadata.

    The canvas and region mode are those of `resolve_settings` (a canvas of more than `max_pixels` is refused).

    `scope` (`Composer.scope` of the live concepts): in latent region mode each region applies only the concepts its
    prompt names.

    Concept tokens are case-insensitive: every prompt is respelled with the tokens as stored (`<DogA>` -> `<doga>`,
    also in the metadata), which diffusers needs to use all of a token's vectors.

    The pipeline's scheduler and attention processors are restored afterwards.
    """
    settings = resolve_settings(pipe, canonical_settings(pipe, settings), max_pixels)
    width, height = settings.size
    seeds = [settings.seed + i for i in range(settings.n)]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    previous = pipe.scheduler
    pipe.scheduler = make_scheduler(settings.scheduler, previous.config)
    try:
        with regional_prompting(pipe, settings.regions, height=height, width=width,
                                negative_prompt=settings.negative,
                                classifier_free_guidance=settings.guidance > 1,
                                mode=settings.region_mode, scope=scope), torch.no_grad():
            images = pipe(prompt=settings.prompt, negative_prompt=settings.negative, height=height, width=width,
                          num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                          num_images_per_prompt=settings.n, generator=generators, output_type="pil").images
    finally:
        pipe.scheduler = previous
    for image, seed in zip(images, seeds, strict=True):
        image.info.update(parameters=infotext(settings, seed, (width, height), model, concepts or {}, loras or {}),
                          seed=seed)
    return images


def canonical_settings(pipe: StableDiffusionPipeline, settings: GenerationSettings) -> GenerationSettings:
    """`settings` with every prompt's concept tokens spelled as the pipeline's tokenizer holds them."""
    def spell(text: str | None) -> str | None:
        return None if text is None else canonical_prompt(pipe.tokenizer, text)

    regions = tuple(replace(r, prompt=spell(r.prompt), negative=spell(r.negative)) for r in settings.regions)
    return replace(settings, prompt=spell(settings.prompt), negative=spell(settings.negative), regions=regions)


def _quote(value: object) -> str:
    """A1111's quoting: values with separators become JSON strings, so its infotext parser reads them back whole."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:\n"') else text


def infotext(settings: GenerationSettings, seed: int, size: tuple[int, int], model: str,
             concepts: Mapping[str, float], loras: Mapping[str, float] | None = None) -> str:
    """The A1111 `parameters` text of one image, from `settings` as `resolve_settings` returns them."""
    fields: dict[str, object] = {
        "Steps": settings.steps,
        "Sampler": SCHEDULERS[settings.scheduler][2],
        "CFG scale": f"{settings.guidance:g}",
        "Seed": seed,
        "Size": f"{size[0]}x{size[1]}",
    }
    if model:
        fields["Model"] = model
    if concepts:
        fields["Concepts"] = ", ".join(f"{name}: {weight:g}" for name, weight in concepts.items())
    if loras:
        fields["Loras"] = ", ".join(f"{name}: {weight:g}" for name, weight in loras.items())
    if settings.regions:
        fields["Regions"] = " | ".join(r.describe() for r in settings.regions)
        negatives = [r.negative or "" for r in settings.regions]
        if any(negatives):
            fields["Region negative prompts"] = " | ".join(negatives)
        feathers = {r.feather for r in settings.regions}
        if feathers != {0.0}:
            fields["Region feather"] = ", ".join(f"{r.feather:g}" for r in settings.regions)
        if settings.region_mode != "attention":  # the default stays unwritten, so older metadata is unchanged
            fields["Region mode"] = settings.region_mode
    lines = [settings.prompt]
    if settings.negative:
        lines.append(f"Negative prompt: {settings.negative}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields.items()))
    return "\n".join(lines)


_NAME = re.compile(r"(\d{5})-\d+\.png")


def _metadata(image: Image.Image, key: str) -> object:
    """`image.info[key]` as `generate` sets it; an image without it is refused in one line, not a KeyError."""
    if key not in image.info:
        raise SpectralDiffusionError(f"this image has no info[{key!r}] (generate sets it); pass the parameters text "
                                     "to save_png(path, image, parameters)")
    return image.info[key]


def _png_info(parameters: str) -> PngInfo:
    info = PngInfo()
    info.add_text("parameters", parameters)
    return info


def save_png(path: str | Path, image: Image.Image, parameters: str | None = None) -> Path:
    """Write one PNG atomically under `path`, with A1111's `parameters` text chunk: `parameters`, else the image's
    own (`image.info["parameters"]`, as `generate` sets it)."""
    info = _png_info(_metadata(image, "parameters") if parameters is None else parameters)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def save_images(images: Sequence[Image.Image], out_dir: str | Path) -> list[Path]:
    """Write `generate`'s images as `NNNNN-<seed>.png` files (with their `parameters`) numbered after the highest
    index already in `out_dir`; never overwrites.

    Each PNG is written to a temporary file and hard-linked to its final name, which fails instead of clobbering a
    file that appeared meanwhile (the index is then bumped), so a reader never sees a half-written image.
    """
    out = check_output_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = 1 + max((int(m[1]) for p in out.iterdir() if (m := _NAME.fullmatch(p.name))), default=-1)
    written = []
    for image in images:
        parameters, seed = _metadata(image, "parameters"), _metadata(image, "seed")
        tmp = out / f".png-{uuid.uuid4().hex[:12]}.tmp"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # not mkstemp's 0600: umask applies
        try:
            with os.fdopen(fd, "wb") as handle:
                image.save(handle, format="PNG", pnginfo=_png_info(parameters))
            while True:
                path = out / f"{index:05d}-{seed}.png"
                index += 1
                try:
                    os.link(tmp, path)
                    break
                except FileExistsError:
                    continue
        finally:
            os.unlink(tmp)
        written.append(path)
    return written
