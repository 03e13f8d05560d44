"""How much should closed-form fusion hold ordinary prompts to the base? A sweep of its prior weight at N = 8.

    .venv/bin/python benchmarks/prior_weight.py [--weights W ...] [--seeds K] [--cache DIR] [--out FILE]

The fusion benchmark's eight additive concepts (trained by the recipe, from the same cache) are fused with the
recipe's method and prior captions, once per prior weight; each run scores every concept's identity and prompt
fidelity in the fused model, and the fused model's two regional pairs (latent mode), as `fusion_quality.py` does.
The prior keeps ordinary prompts mapped as the base maps them; every concept's prompts pull the other way wherever
its own model also moved the shared parts of a prompt (the padding positions carry most of it), so the weight trades
identity against fidelity. Writes docs/results/prior_weight.md unless --no-write.
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from fusion_quality import (
    CONCEPTS,
    FULL,
    ROOT,
    cached,
    evaluate_single,
    judge_key,
    machine,
    regional_pairs,
    train_concepts,
)

from spectral_diffusion.fingerprint import base_fingerprint
from spectral_diffusion.fusion import fuse
from spectral_diffusion.models import load_base
from spectral_diffusion.toyworld.judge import JUDGE_PATH, Judge
from spectral_diffusion.toyworld.recipe import RECIPE
from spectral_diffusion.toyworld.scoring import Sampling, retention, score_concept, score_regional

DOC = ROOT / "docs" / "results" / "prior_weight.md"


def evaluate(base: StableDiffusionPipeline, judge: Judge, paths: list[Path], weight: float, sampling: Sampling) -> dict:
    pipe = copy.deepcopy(base)
    fuse(paths, pipe, **{**RECIPE.fuse_options(), "prior_weight": weight})
    scores = {name: score_concept(pipe, judge, name, sampling).to_dict() for name in CONCEPTS}
    regional = [score_regional(pipe, judge, CONCEPTS[a], CONCEPTS[b], sampling, mode="latent").success
                for a, b in regional_pairs(len(CONCEPTS))]
    return {"concepts": scores, "regional": regional}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.1, 0.3, 1.0],
                        help="prior weights to try (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=FULL.seeds, help="seeds per prompt (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "fusion_quality",
                        help="trained concepts and scores, shared with fusion_quality.py (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DOC, help=f"results file (default: {DOC.relative_to(ROOT)})")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["SPECTRAL_DIFFUSION_CACHE"] = str(args.cache / "cache")  # as fusion_quality.py: its own SVD cache

    judge = Judge.load()
    base = load_base("toy", dtype=torch.float32)
    fingerprint = base_fingerprint(base.unet, base.text_encoder)
    plan = FULL
    sampling = Sampling(steps=plan.sample_steps, n=args.seeds)
    paths = train_concepts(args.cache, CONCEPTS, "additive", RECIPE.rank, plan, "toy", fingerprint, None)
    results = args.cache / "results" / f"{fingerprint}-{plan.key()}-{judge_key(JUDGE_PATH)}"
    single = cached(results / f"single-additive-r{RECIPE.rank}.json", evaluate_single, base, judge, CONCEPTS, paths,
                    sampling)["concepts"]
    header = "| prior weight | " + " | ".join(f"`{n}`" for n in CONCEPTS) + \
        " | retention (mean) | fidelity fused | regional (latent) |"
    lines = [header, "|" + " --- |" * (len(CONCEPTS) + 4)]
    lines.append("| alone | " + " | ".join(f"{single[n]['identity']:.2f}" for n in CONCEPTS) +
                 f" | – | {sum(single[n]['fidelity'] for n in CONCEPTS) / len(CONCEPTS):.2f} | – |")
    for weight in args.weights:
        fused = cached(results / f"prior-weight-{weight:g}-s{args.seeds}.json", evaluate, base, judge, paths, weight,
                       sampling)
        scores = fused["concepts"]
        kept = retention(sum(scores[n]["identity"] for n in CONCEPTS), sum(single[n]["identity"] for n in CONCEPTS))
        fidelity = sum(scores[n]["fidelity"] for n in CONCEPTS) / len(CONCEPTS)
        regional = sum(fused["regional"]) / len(fused["regional"])
        lines.append(f"| {weight:g} | " + " | ".join(f"{scores[n]['identity']:.2f}" for n in CONCEPTS) +
                     f" | {kept:.2f} | {fidelity:.2f} | {regional:.2f} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        command = "benchmarks/prior_weight.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        args.out.write_text(
            f"# Closed-form fusion: the prior weight at N = 8\n\nMade by `.venv/bin/python {command.strip()}` on "
            f"{datetime.now(timezone.utc):%Y-%m-%d} ({machine()}). Base `toy` (fingerprint {fingerprint}); the "
            f"fusion benchmark's eight additive concepts, trained by the recipe; fused with closed-form and the "
            f"recipe's {RECIPE.prior_captions} ordinary captions at each prior weight; identity per concept in the "
            f"fused model, {args.seeds} seeds, {sampling.steps} DPM++ steps, CFG {sampling.guidance:g}; regional: "
            f"pairs {', '.join(f'{CONCEPTS[a]} | {CONCEPTS[b]}' for a, b in regional_pairs(len(CONCEPTS)))}, "
            f"latent mode.\n\n{table}\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
