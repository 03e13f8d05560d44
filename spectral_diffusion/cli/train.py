"""`spectral-diffusion train PHOTO_DIR --token "<dogA>" --out dogA.safetensors`: one concept from a photo folder."""

from __future__ import annotations

import argparse

from spectral_diffusion.cli.options import add_config_arguments, config_from_args
from spectral_diffusion.models import BaseSpec
from spectral_diffusion.training.config import TrainConfig, recommended_settings

EPILOG = """\
The folder holds jpg/jpeg/png/webp/bmp photos, optional same-name .txt captions using {token} and {class_word}
(default caption: "a photo of {token} {class_word}"), and optional masks (<name>_mask.png or masks/<name>.png,
white = subject) that weight the loss. Writes CONCEPT.safetensors, a sidecar CONCEPT.json for listings,
CONCEPT.preview.png and the loss log CONCEPT.loss.csv (step,loss,lr,seconds). The token is the trigger word, stored
lower-case. Progress is a bar on a terminal and ~10 plain lines in a log. Checkpoints go to CONCEPT.safetensors.ckpt/ (removed when training completes); Ctrl-C writes
one, and the same command with --resume continues exactly where it stopped. Multi-GPU: accelerate launch -m
spectral_diffusion train ... See docs/training.md.

Settings not given on the command line come from the base model's recommended recipe where its folder has a
training_defaults.json (the bundled toy model has one: `spectral-diffusion toyworld recipe` prints it as flags),
else from the defaults shown here (aimed at SD 1.5). The settings taken from the base are printed first. Every
switch has its opposite, so a flag can undo any of them (--flip where the base's file says "flip": false).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a concept (adapter band + new token) from a folder of photos",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, BaseSpec)  # the --base flags every command shares
    add_config_arguments(p, TrainConfig, given_only=True)  # every other flag: TrainConfig's fields and help
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spectral_diffusion.training.trainer import train

    base = config_from_args(BaseSpec, args)
    recipe = {key: value for key, value in recommended_settings(base.spec).items() if not hasattr(args, key)}
    config = config_from_args(TrainConfig, args, defaults=recipe, base=base)
    if recipe:
        print("the base model's training defaults: " + ", ".join(f"{k} {v}" for k, v in recipe.items()), flush=True)
    print(train(config))
    return 0
