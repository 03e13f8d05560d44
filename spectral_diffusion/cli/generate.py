"""`spectral-diffusion generate --prompt P`: images from a fused model or from concepts composed live on a base."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from spectral_diffusion.cli.fuse import parse_weights
from spectral_diffusion.cli.options import add_config_arguments, config_from_args
from spectral_diffusion.compose import Composer, concept_weights
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.fusion import read_fusion_json
from spectral_diffusion.generation import (
    MAX_PIXELS,
    MAX_SEED,
    SCHEDULERS,
    GenerationSettings,
    check_output_dir,
    generate,
    parse_size,
    resolve_seed,
    resolve_settings,
    save_images,
)
from spectral_diffusion.loras import parse_lora_arg, set_loras
from spectral_diffusion.models import BaseSpec
from spectral_diffusion.pipeline import CONCEPTS_DIR, merge_weights, prompt_tags
from spectral_diffusion.progress import is_terminal
from spectral_diffusion.regional import REGION_MODE_CHOICES, parse_regions

EPILOG = """\
Regions: --region "<dogA> dog, sitting:0,0,0.5,1" gives the part of the image in the relative box x0,y0,x1,y1
(after the LAST colon) its own prompt; "PROMPT:mask.png" uses a greyscale mask image instead of a box. Repeat for
more regions. --region-negative gives the regions, in order, their own negative prompts; --feather softens box edges.
--region-mode attention gives each region its own prompt in cross-attention over the whole image; --region-mode
latent denoises each region on its own latent window (a region of the model's native size is drawn as a whole native
image) and blends the predictions by the region masks, for models that draw one subject per image; with --concepts
(live, not fused) each region's pass then applies only the concepts whose token its prompt holds. --region-mode auto
(default) is latent when every region (a mask: the bounding box of its non-zero pixels) spans at least the model's
native size on the canvas, else attention. Without --size, regions get the smallest canvas on which each spans the
native size (two half-width boxes: 128x64 on the toy model, 1024x512 on SD 1.5); the chosen canvas and mode are
printed and recorded in the metadata.

LoRAs: --lora FILE[:W] (repeatable; PEFT, kohya or LoCon .safetensors as diffusers loads them, weight 1 by default)
or A1111's <lora:NAME:W> in --prompt, NAME being NAME.safetensors in --lora-dir (the tag is removed from the text the
model sees). LoRAs are fused into the base weights, beside any live --concepts, and recorded in the metadata.
Likewise <concept:NAME:W> in --prompt applies NAME.safetensors of --concepts-dir live at weight W (default 1), as
--concepts NAME.safetensors --weights W would, and is recorded the same way.

Each PNG records its settings in A1111's "parameters" text chunk; image i of a run uses seed S+i, so any image
can be remade alone; --seed -1 draws a random seed (as the app does). Files are numbered after those already in
--out and never overwritten. Every number is checked before the model is loaded: weights and guidance must be
finite, seeds within 0..4294967295, and a --size at most --max-pixels (a canvas fitted to the regions is checked
once the model is loaded).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="generate images from a fused model or live-composed concepts, with regional prompts",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", required=True, help="the (global) prompt")
    p.add_argument("--negative", default="", help="negative prompt (default: none)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a model folder written by `fuse` (or any diffusers SD 1.x folder), instead of --base")
    p.add_argument("--concepts", nargs="+", default=[], metavar="CONCEPT.safetensors",
                   help="concept files to compose live on --base")
    p.add_argument("--weights", type=parse_weights, default=None, metavar="W1,W2,...",
                   help="comma-separated weight per concept, in order (default: 1 each)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:W]",
                   help="an ordinary LoRA file and its weight (default 1), applied with the concepts (repeatable)")
    p.add_argument("--lora-dir", default="loras", metavar="DIR",
                   help="folder of the LoRAs that <lora:NAME:W> in --prompt names (default: loras)")
    p.add_argument("--concepts-dir", default=CONCEPTS_DIR, metavar="DIR",
                   help=f"folder of the concepts that <concept:NAME:W> in --prompt names (default: {CONCEPTS_DIR}, "
                        "as the app's)")
    p.add_argument("--seed", type=int, default=0,
                   help=f"seed of the first image, 0..{MAX_SEED} or -1 for a random one; image i uses seed+i "
                        "(default: 0)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    p.add_argument("--guidance", type=float, default=7.0, help="classifier-free guidance scale (default: 7)")
    p.add_argument("--sampler", "--scheduler", dest="sampler", choices=list(SCHEDULERS), default="dpm++",
                   help="sampler (a diffusers scheduler), written as A1111's Sampler in the PNG metadata: "
                        + ", ".join(f"{k} = {v[2]}" for k, v in SCHEDULERS.items())
                        + "; --scheduler is the older spelling (default: dpm++)")
    p.add_argument("--size", type=_size, default=None, metavar="WxH",
                   help="image size (default: the model's native size; with --region, the smallest canvas on "
                        "which every region spans the native size)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                   help=f"refuse canvases of more than N pixels (default: {MAX_PIXELS}, i.e. 1024x1024)")
    p.add_argument("--n", type=int, default=1, help="number of images (default: 1)")
    p.add_argument("--out", default="outputs", metavar="DIR", help="folder for the PNGs (default: outputs)")
    p.add_argument("--region", action="append", default=[], metavar="PROMPT:x0,y0,x1,y1",
                   help="a regional prompt with its relative box or mask image (repeatable)")
    p.add_argument("--region-negative", action="append", default=[], metavar="NEGATIVE",
                   help="negative prompt of the next region, in order (repeatable; default: --negative)")
    p.add_argument("--feather", type=float, default=0.0,
                   help="width of the soft edge of region boxes, relative to the image side (default: 0)")
    p.add_argument("--region-mode", choices=list(REGION_MODE_CHOICES), default="auto",
                   help="attention: regions' prompts blended in cross-attention; latent: each region denoised on its "
                        "own latent window, predictions blended by the masks; auto: latent when every region spans "
                        "the model's native size, else attention (default: auto)")
    add_config_arguments(p, BaseSpec)
    p.set_defaults(func=run)


def _size(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except SpectralDiffusionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    # every check runs before the (slow) base model loads, and before --out is made
    tags = prompt_tags(args.prompt, lora_dir=args.lora_dir, concepts_dir=args.concepts_dir)
    if args.model and (args.concepts or tags.concepts):
        raise SpectralDiffusionError("concepts (--concepts, <concept:...>) are composed on the base they were trained "
                                     "on: use --base, not --model")
    live = merge_weights("concept", concept_weights(args.concepts, args.weights), tags.concepts)
    regions = parse_regions(args.region, negatives=args.region_negative, feather=args.feather)
    settings = GenerationSettings(prompt=tags.prompt, negative=args.negative, steps=args.steps,
                                  guidance=args.guidance, scheduler=args.sampler, seed=resolve_seed(args.seed),
                                  size=args.size, n=args.n, regions=regions, region_mode=args.region_mode)
    settings.check_size(args.max_pixels)
    loras = merge_weights("LoRA", *(dict([parse_lora_arg(spec)]) for spec in args.lora), tags.loras)
    check_output_dir(args.out)
    spec = config_from_args(BaseSpec, args)
    base = replace(spec, spec=args.model).load() if args.model else spec.load()
    pipe = base.pipe
    settings = resolve_settings(pipe, settings, args.max_pixels)
    if regions:
        width, height = settings.size
        print(f"canvas {width}x{height}, region mode {settings.region_mode}")
    concepts: dict[str, float] = {}
    scope = None
    if args.model:
        fusion = read_fusion_json(args.model) or {}
        concepts = {Path(c["path"]).name if c.get("path") else c["token"]: c["weight"]
                    for c in fusion.get("concepts", [])}
    elif live:
        composer = Composer(pipe, fingerprint=base.fingerprint)
        composer.set_concepts(live)
        concepts = {path.name: weight for path, weight in live.items()}
        scope = composer.scope
    set_loras(pipe, loras)
    model = Path(args.model).name if args.model else spec.spec
    pipe.set_progress_bar_config(disable=not is_terminal(), desc=f"sampling {settings.n} image(s)", leave=False)
    images = generate(pipe, settings, model=model, concepts=concepts, scope=scope, max_pixels=args.max_pixels,
                      loras={path.name: weight for path, weight in loras.items()})
    for path in save_images(images, args.out):
        print(f"wrote {path}")
    return 0
