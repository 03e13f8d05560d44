"""`spectral-diffusion toyworld ...`: build the bundled toy world (concept photos, base model, judge) and check it."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from spectral_diffusion.cli.options import add_config_arguments, config_from_args
from spectral_diffusion.models import BaseSpec
from spectral_diffusion.toyworld.pretrain import PretrainConfig

# `toyworld pretrain` flags: PretrainConfig's fields with their help (cli/options.py), the defaults are its own.
PRETRAIN_FLAGS = {
    "out": {"help": "run folder: checkpoints, latents, log.txt, samples"},
    "model_dir": {"help": "where the finished diffusers folder goes", "default_help": "the package's bundled model"},
    "vae_from": {"metavar": "MODEL_DIR", "help": "reuse the VAE of this diffusers folder and skip stage 1 (e.g. the "
                                                 "bundled model's, spectral_diffusion/toyworld/model)"},
    "init_from": {"metavar": "MODEL_DIR", "help": "start the UNet and text encoder from this diffusers folder's (a "
                                                  "fine-tuning run, e.g. the bundled model after a change of the "
                                                  "world); its vocabulary must be the world's"},
    "pattern_share": {"help": "share of the scenes drawn in a pattern (two or three colours)"},
    "warmup_steps": {"help": "learning-rate warm-up steps of each stage"},
    "vae_minutes": {"help": "VAE training budget"},
    "unet_minutes": {"help": "UNet + text encoder training budget"},
    "num_scenes": {"flag": "--scenes", "help": "rendered training scenes"},
    "threads": {"help": "torch CPU threads"},
    "device": {"help": "cpu or cuda; see docs/toyworld.md for the GPU recipe"},
    "vae_batch": {"help": "VAE batch size, half clutter"},
    "unet_batch": {"help": "UNet samples per step, noise draws included"},
    "noise_draws": {"help": "noise draws per encoded caption; --unet-batch must be a multiple"},
    "unet_lr": {"help": "UNet + text encoder peak learning rate"},
    "seed": {"help": "seed of everything random"},
    "resume": {"help": "continue from the checkpoints in --out"},
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("toyworld", help="the bundled toy world: concept photos, base model, judge",
                              description=__doc__)
    sub = p.add_subparsers(dest="toyworld_command", required=True, metavar="ACTION")

    c = sub.add_parser("render-concepts", help="write the held-out concepts' photo folders + README")
    c.add_argument("--out", type=Path, default=Path("concepts/toyworld"), help="root folder (default: %(default)s)")
    c.add_argument("--count", type=int, default=8, help="photos per concept (default: %(default)s)")
    c.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    c.set_defaults(func=_render_concepts)

    t = sub.add_parser("pretrain", help="pretrain the toy base model (VAE, then UNet + text encoder)",
                       description="Time-budgeted, checkpointed pretraining; Ctrl-C saves, --resume continues.")
    add_config_arguments(t, PretrainConfig, PRETRAIN_FLAGS)
    t.set_defaults(func=_pretrain)

    j = sub.add_parser("train-judge", help="train the judge CNN on renders and report validation accuracy")
    j.add_argument("--out", type=Path, default=None, help="weights file (default: the package's bundled judge)")
    j.add_argument("--steps", type=int, default=1500, help="(default: %(default)s)")
    j.add_argument("--vae-from", default="toy", metavar="SPEC",
                   help="base model whose VAE reconstructions augment the renders; 'none' to skip "
                        "(default: %(default)s)")
    j.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    j.set_defaults(func=_train_judge)

    r = sub.add_parser("recipe", help="print the toy concept recipe as `train` flags (or its fusion method)",
                       description="The settings the demo, the benchmarks and pipelines/ train toy concepts with "
                                   "(spectral_diffusion/toyworld/recipe.py), as flags to paste after "
                                   "`spectral-diffusion train PHOTOS --token T --class-word W --out F`.")
    r.add_argument("--variant", default="additive", help="adapter kind whose learning rates to print (default: %(default)s)")
    r.add_argument("--fusion", action="store_true",
                   help="print the recipe's `fuse` flags instead (closed-form: use with the captions of `toyworld "
                        "captions` as --prior-prompts)")
    r.set_defaults(func=_recipe)

    k = sub.add_parser("captions", help="print captions of ordinary scenes, one per line (the locality term's "
                                        "--locality-captions and closed-form fusion's --prior-prompts)")
    k.add_argument("--num", type=int, default=64, help="how many (default: %(default)s)")
    k.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    k.set_defaults(func=_captions)

    e = sub.add_parser("eval-base", help="judge the base model on vocabulary prompts (shape/colour/background)")
    add_config_arguments(e, BaseSpec)
    e.add_argument("--num", type=int, default=64, help="prompts, one image each (default: %(default)s)")
    e.add_argument("--steps", type=int, default=20, help="sampling steps (default: %(default)s)")
    e.add_argument("--guidance", type=float, default=5.0, help="CFG scale (default: %(default)s)")
    e.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    e.add_argument("--grid", type=Path, default=None, help="also save the samples as one PNG grid")
    e.set_defaults(func=_eval_base)


def _render_concepts(args: argparse.Namespace) -> None:
    from spectral_diffusion.toyworld.concepts import write_all_concepts

    for folder in write_all_concepts(args.out, seed=args.seed, count=args.count):
        print(folder)


def _recipe(args: argparse.Namespace) -> None:
    from spectral_diffusion.toyworld.recipe import RECIPE

    if args.fusion:
        options = RECIPE.fuse_options()
        flags = ["--method", str(options["method"])]
        if "prior_weight" in options:
            flags += ["--prior-weight", f"{options['prior_weight']:g}"]
        print(shlex.join(flags))
    else:
        print(shlex.join(RECIPE.cli_flags(args.variant)))


def _captions(args: argparse.Namespace) -> None:
    from spectral_diffusion.toyworld.recipe import ordinary_captions

    print("\n".join(ordinary_captions(args.num, args.seed)))


def _pretrain(args: argparse.Namespace) -> None:
    from spectral_diffusion.toyworld.pretrain import pretrain

    print(pretrain(config_from_args(PretrainConfig, args, PRETRAIN_FLAGS)))


def _train_judge(args: argparse.Namespace) -> None:
    from spectral_diffusion.models import load_base
    from spectral_diffusion.toyworld.judge import JUDGE_PATH, train_judge

    vae = None if args.vae_from == "none" else load_base(args.vae_from, device="cpu").vae
    report = train_judge(args.out or JUDGE_PATH, steps=args.steps, vae=vae, seed=args.seed)
    print(json.dumps(report, indent=2))


def _eval_base(args: argparse.Namespace) -> None:
    from spectral_diffusion.toyworld.evaluate import evaluate_base, image_grid
    from spectral_diffusion.toyworld.judge import Judge

    pipe = config_from_args(BaseSpec, args).load().pipe
    metrics, images, _ = evaluate_base(pipe, Judge.load(), num=args.num, seed=args.seed, steps=args.steps,
                                       guidance=args.guidance)
    if args.grid is not None:
        image_grid(images).save(args.grid)
    print(json.dumps(metrics, indent=2))
