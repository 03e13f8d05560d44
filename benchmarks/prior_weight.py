"""How much should closed-form fusion hold ordinary prompts to the base? A sweep of its prior weight.

    .venv/bin/python benchmarks/prior_weight.py [--counts N ...] [--weights W ...] [--seeds K] [--cache DIR]
        [--out FILE]

The first N of the fusion benchmark's eight additive concepts (trained by the recipe, from the same cache) are fused
with the recipe's method and prior captions, once per prior weight; each run scores every fused concept's identity
and prompt fidelity, the fused model's regional pairs (latent mode), as `fusion_quality.py` does, and what the prior
is for: how well the fused model still draws 64 ordinary scenes (shape, colour and background all right, read by
the judge; scenes other than the prior's captions). The prior keeps ordinary prompts mapped as the base maps them;
each concept's prompts pull the other way wherever its own model also moved the parts of a prompt they share (the
padding positions carry most of a concept), so the weight trades identity against the base's behaviour. Writes
docs/results/prior_weight.md unless --no-write.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from fusion_quality import (
    CONCEPTS,
    FULL,
    ROOT,
    add_run_arguments,
    cached,
    evaluate_single,
    judge_key,
    machine,
    regional_pairs,
    start_run,
    train_concepts,
)

from spectral_diffusion.atomic import atomic_write
from spectral_diffusion.fingerprint import base_fingerprint
from spectral_diffusion.fusion import fuse
from spectral_diffusion.models import load_base
from spectral_diffusion.toyworld.evaluate import evaluate_base
from spectral_diffusion.toyworld.judge import JUDGE_PATH, Judge
from spectral_diffusion.toyworld.recipe import RECIPE
from spectral_diffusion.toyworld.scoring import Sampling, retention, score_concept, score_regional

DOC = ROOT / "docs" / "results" / "prior_weight.md"


def evaluate(base: StableDiffusionPipeline, judge: Judge, names: Sequence[str], paths: Sequence[Path], weight: float,
             sampling: Sampling) -> dict:
    pipe = copy.deepcopy(base)
    fuse(list(paths), pipe, **{**RECIPE.fuse_options(), "prior_weight": weight})
    scores = {name: score_concept(pipe, judge, name, sampling).to_dict() for name in names}
    regional = [score_regional(pipe, judge, names[a], names[b], sampling, mode="latent").success
                for a, b in regional_pairs(len(names))]
    return {"concepts": scores, "regional": regional, "ordinary": ordinary_accuracy(pipe, judge, sampling)}


def ordinary_accuracy(pipe: StableDiffusionPipeline, judge: Judge, sampling: Sampling) -> float:
    """Share of 64 ordinary scenes drawn right (shape, colour, background); seed 1000, not the prior's captions'."""
    return evaluate_base(pipe, judge, num=64, seed=1000, steps=sampling.steps, guidance=sampling.guidance)[0]["all"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[4, 8], choices=range(2, len(CONCEPTS) + 1),
                        metavar="N", help="numbers of concepts fused, 2 to 8 (default: %(default)s)")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.1, 0.3, 1.0],
                        help="prior weights to try (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=FULL.seeds, help="seeds per prompt (default: %(default)s)")
    add_run_arguments(parser, DOC, ROOT / "runs" / "fusion_quality",
                      "trained concepts and scores, shared with fusion_quality.py")
    args = parser.parse_args(argv)
    start_run(args)

    judge = Judge.load()
    base = load_base("toy", dtype=torch.float32)
    fingerprint = base_fingerprint(base.unet, base.text_encoder)
    plan = FULL
    sampling = Sampling(steps=plan.sample_steps, n=args.seeds)
    paths = train_concepts(args.cache, CONCEPTS, "additive", RECIPE.rank, plan, "toy", fingerprint, None)
    results = args.cache / "results" / f"{fingerprint}-{plan.key()}-{judge_key(JUDGE_PATH)}"
    single = cached(results / f"single-additive-r{RECIPE.rank}.json", evaluate_single, base, judge, CONCEPTS, paths,
                    sampling)["concepts"]
    base_ordinary = cached(results / "ordinary-base.json", lambda: {"all": ordinary_accuracy(base, judge, sampling)})
    lines = ["| N | prior weight | identity alone | identity fused | retention | fidelity fused | regional (latent) | "
             "ordinary scenes drawn right |", "|" + " --- |" * 8,
             f"| – | unfused base | – | – | – | – | – | {base_ordinary['all']:.2f} |"]
    per_concept = []
    for n in args.counts:
        names = CONCEPTS[:n]
        alone = sum(single[name]["identity"] for name in names) / n
        for weight in args.weights:
            fused = cached(results / f"prior-weight-{weight:g}-n{n}-s{args.seeds}.json", evaluate, base, judge, names,
                           paths[:n], weight, sampling)
            scores = fused["concepts"]
            identity = sum(scores[name]["identity"] for name in names) / n
            fidelity = sum(scores[name]["fidelity"] for name in names) / n
            regional = sum(fused["regional"]) / len(fused["regional"])
            lines.append(f"| {n} | {weight:g} | {alone:.2f} | {identity:.2f} | {retention(identity, alone):.2f} | "
                         f"{fidelity:.2f} | {regional:.2f} | {fused['ordinary']:.2f} |")
            per_concept.append(f"| {n} | {weight:g} | " + " | ".join(
                f"{scores[name]['identity']:.2f}" if name in scores else "–" for name in CONCEPTS) + " |")
            print(lines[-1], flush=True)
    concept_head = "| N | prior weight | " + " | ".join(f"`{name}`" for name in CONCEPTS) + " |"
    concept_lines = [concept_head, "|" + " --- |" * (len(CONCEPTS) + 2),
                     "| – | alone | " + " | ".join(f"{single[name]['identity']:.2f}" for name in CONCEPTS) + " |",
                     *per_concept]
    table = "\n".join(lines) + "\n\nIdentity per concept:\n\n" + "\n".join(concept_lines)
    print(table)
    if not args.no_write:
        command = "benchmarks/prior_weight.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        text = (
            f"# Closed-form fusion: the prior weight\n\nMade by `.venv/bin/python {command.strip()}` on "
            f"{datetime.now(timezone.utc):%Y-%m-%d} ({machine()}). Base `toy` (fingerprint {fingerprint}); the "
            f"first N of the fusion benchmark's eight additive concepts, trained by the recipe; fused with closed-form "
            f"and the recipe's {RECIPE.prior_captions} ordinary captions at each prior weight; {args.seeds} seeds, "
            f"{sampling.steps} DPM++ steps, CFG {sampling.guidance:g}; regional: the benchmark's pairs, latent mode; "
            f"ordinary scenes: 64 captions of random scenes (seed 1000), one image each, all of shape, colour and "
            f"background right.\n\n{table}\n")
        atomic_write(args.out, lambda tmp: tmp.write_text(text))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
