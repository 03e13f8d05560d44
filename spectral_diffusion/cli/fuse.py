"""`spectral-diffusion fuse C1.safetensors C2.safetensors ... --out FUSED`: merge concept files into one model."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from spectral_diffusion.cli.options import add_config_arguments, config_from_args
from spectral_diffusion.export import FORMATS as LORA_FORMATS
from spectral_diffusion.fusion import (
    METHODS,
    OUTPUT_FORMATS,
    RECOMMENDED_METHOD,
    check_format,
    check_output,
    check_request,
    fuse,
    save_fused,
)
from spectral_diffusion.models import BaseSpec
from spectral_diffusion.prompts import read_prompts

EPILOG = """\
methods: closed-form (default) solves, per text-fed layer (cross-attention keys / values, text encoder), the weight
that maps each concept's own prompts as its own model did and ordinary prompts (the empty prompt, the class words,
the concepts' captions without their tokens, and --prior-prompts) as the base did; other layers get the exact sum.
It kept identity best at every N in docs/results/fusion_quality.md. spectral adds every concept's exact weight
change, w_i * dW_i (concepts additive or rotational, in disjoint bands; the only choice for --format lora with
sum and mean). sum (task arithmetic), mean (each delta / N), ties, dare and gradient (Mix-of-Show's gradient
fusion, solved in closed form) are baselines for comparison and accept lora/ortho concepts too. Every method
refuses concepts of another base model and duplicate tokens.

OUT is a folder: a diffusers pipeline (--format diffusers, loads with StableDiffusionPipeline.from_pretrained,
tokens included), or OUT/OUT.safetensors as an SD 1.x checkpoint (single-file) or one merged LoRA (lora: spectral,
sum and mean only, exact) with the tokens' textual-inversion embeddings in OUT/embeddings/, since neither file can
hold new tokens. fusion.json records the concepts, tokens, bands, fingerprints, weights and method.
"""


def parse_weights(text: str) -> list[float]:
    """`"1,0.8"` -> [1.0, 0.8]."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"weights must be comma-separated numbers such as 1,0.8, got {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fuse", help="merge several concept files into one model (diffusers folder, single file or LoRA)",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("concepts", nargs="+", metavar="CONCEPT.safetensors", help="concept files to fuse")
    p.add_argument("--out", required=True, metavar="OUT", help="output folder")
    p.add_argument("--format", choices=OUTPUT_FORMATS, default="diffusers", help="what to write (default: diffusers)")
    p.add_argument("--lora-format", choices=LORA_FORMATS, default="peft",
                   help="key layout of --format lora: peft (diffusers) or kohya (A1111, ComfyUI) (default: peft)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--method", choices=METHODS, default=RECOMMENDED_METHOD,
                   help="fusion method (default: %(default)s)")
    p.add_argument("--weights", type=parse_weights, default=None, metavar="W1,W2,...",
                   help="comma-separated weight per concept, in order (default: 1 each)")
    p.add_argument("--allow-overlap", action="store_true",
                   help="spectral: fuse concepts whose bands overlap anyway (they interfere; for experts)")
    p.add_argument("--seed", type=int, default=0, help="seed of dare's drop pattern and gradient's sampling (default: 0)")
    p.add_argument("--density", type=float, default=0.5,
                   help="ties/dare: fraction of each delta's entries kept (default: 0.5)")
    p.add_argument("--ridge", type=float, default=1e-4,
                   help="gradient, closed-form: ridge towards the base weight, relative to the Gram trace "
                        "(default: 1e-4)")
    p.add_argument("--prior-weight", type=float, default=1.0,
                   help="closed-form: weight of ordinary prompts (kept as the base maps them) against the "
                        "concepts' own prompts (default: 1)")
    p.add_argument("--prior-prompts", default=None, metavar="FILE",
                   help="closed-form: a text file of ordinary captions (one per line) that must keep the base "
                        "model's mapping, besides the empty prompt, the class words and the concepts' captions "
                        "without their tokens (default: none)")
    p.add_argument("--record-steps", type=int, default=4,
                   help="gradient: sampling steps whose layer inputs are recorded per concept (default: 4)")
    p.add_argument("--record-size", type=int, default=None, metavar="PX",
                   help="gradient: image side used while recording (default: the model's native size)")
    add_config_arguments(p, BaseSpec)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_output(out, args.overwrite)
    check_format(args.format, args.method)
    options = dict(density=args.density, ridge=args.ridge, record_steps=args.record_steps,
                   prior_weight=args.prior_weight,
                   prior_prompts=read_prompts(args.prior_prompts) if args.prior_prompts else [])
    weights = check_request(args.concepts, args.method, args.weights, **options)  # before the (slow) base loads
    base = config_from_args(BaseSpec, args).load()
    pipe = base.pipe
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = fuse(args.concepts, pipe, args.method, weights, allow_overlap=args.allow_overlap, seed=args.seed,
                      record_size=args.record_size, fingerprint=base.fingerprint, **options)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    paths = save_fused(pipe, report, out, args.format, lora_format=args.lora_format, overwrite=args.overwrite)
    print(report.summary())
    for path in paths:
        print(f"wrote {path}")
    print(f"trigger words: {', '.join(c.token for c in report.concepts)}")
    if args.format != "diffusers":
        print(f"note: the concept tokens are not inside {paths[0].name}: load the embeddings in {out / 'embeddings'} "
              "as textual inversions (A1111: copy them into its embeddings folder; the trigger word is the file name)")
    return 0
