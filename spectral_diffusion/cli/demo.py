"""`spectral-diffusion demo`: train three toy concepts, fuse them, generate and judge, in minutes on a CPU."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """\
Trains three bundled toy-world concepts (a striped fish, a house with a red door, a bullseye) on the bundled toy
model with the toy recipe (`spectral-diffusion toyworld recipe`: a rank-4 additive Spectral Adapter on the text
pathway, each concept in its own SVD band 0, 1, 2, with the text-side locality term), fuses them with the recipe's
method (closed-form), and generates each concept alone, on a background its photos never had, and two concepts side
by side with regional prompts (latent-window mode by default): with the fused model, and with the concepts live,
each applied only in its own region. The judge (a classifier trained on renders) prints
each concept's identity with its own model and in the fused model, the prompt fidelity, and the regional success.
Writes OUT/grid.png, OUT/images/*.png (with generation metadata), OUT/concepts/*.safetensors and OUT/scores.json.
A second run reuses the trained concepts; --overwrite retrains.
The same steps as separate commands: pipelines/toy_three_concepts.sh.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from spectral_diffusion.regional import REGION_MODES
    from spectral_diffusion.toyworld.demo import DemoConfig

    defaults = DemoConfig()
    p = subparsers.add_parser(
        "demo", help="end-to-end demo on the bundled toy model: train 3 concepts, fuse, generate, judge",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=defaults.out, help="output folder (default: %(default)s)")
    p.add_argument("--steps", type=int, default=defaults.steps, help="training steps per concept (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=defaults.seeds,
                   help="images per prompt that the scores average over (default: %(default)s)")
    p.add_argument("--base", default=defaults.base,
                   help="toy-world base model: 'toy' (bundled) or a folder of one (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--concepts", nargs="+", default=list(defaults.concepts), metavar="NAME",
                   help="toy concepts to train, one band each (default: %(default)s)")
    p.add_argument("--region-mode", choices=REGION_MODES, default=defaults.region_mode,
                   help="how the two-concept images are drawn (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="retrain concepts already in OUT")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spectral_diffusion.toyworld.demo import DemoConfig, run_demo

    config = DemoConfig(out=args.out, base=args.base, device=args.device, concepts=args.concepts, steps=args.steps,
                        seeds=args.seeds, region_mode=args.region_mode, overwrite=args.overwrite)
    result = run_demo(config)
    print(result.table())
    print(f"wrote {result.grid}, {config.out / 'images'}/, {config.out / 'scores.json'} "
          f"in {result.seconds['total']:.0f} s")
    return 0
