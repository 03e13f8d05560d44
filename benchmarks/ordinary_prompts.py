"""What keeps ordinary prompts mapped as the base maps them, and what it costs identity: the ordinary captions of the
locality term in training (`--locality-captions`) and closed-form fusion's prior weight.

    .venv/bin/python benchmarks/ordinary_prompts.py [--trainings recipe locality-captions] [--counts N ...]
        [--weights W ...] [--seeds K] [--cache DIR] [--out FILE]

The first N of the fusion benchmark's eight additive concepts, trained by the recipe (the same cache; its locality
term holds the concept's captions without its token, the empty prompt and foreign tokens) or by the recipe with the
prior's ordinary captions held too (`locality-captions`, written to the cache as a file), are fused with the
recipe's method and prior captions, once per prior weight. Each run scores every fused concept's identity and prompt fidelity, the fused model's regional
pairs (latent mode), as `fusion_quality.py` does, and what both controls are for: how well the fused model still
draws 64 ordinary scenes (shape, colour and background all right, read by the judge; scenes other than the prior's
captions). Each concept's prompts pull the merge away from the base wherever its own model also moved the parts of a
prompt that ordinary prompts share (the padding positions carry most of a concept): the prior weight trades identity
against the base's behaviour at fusion time; the captions keep each concept off ordinary prompts from the start.
Writes docs/results/ordinary_prompts.md unless --no-write.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Sequence
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
    regional_pairs,
    start_run,
    train_concepts,
    write_report,
)

from spectral_diffusion.atomic import atomic_write
from spectral_diffusion.fingerprint import base_fingerprint
from spectral_diffusion.fusion import fuse
from spectral_diffusion.models import load_base
from spectral_diffusion.toyworld.evaluate import evaluate_base
from spectral_diffusion.toyworld.judge import JUDGE_PATH, Judge
from spectral_diffusion.toyworld.recipe import RECIPE
from spectral_diffusion.toyworld.scoring import Sampling, retention, score_concept, score_regional

DOC = ROOT / "docs" / "results" / "ordinary_prompts.md"
TRAININGS = ("recipe", "locality-captions")  # how each arm trains its concepts


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
    parser.add_argument("--trainings", nargs="+", choices=TRAININGS, default=list(TRAININGS),
                        help="how the concepts are trained: the recipe, or the recipe with the prior's ordinary "
                             "captions also held by the locality term (default: both)")
    parser.add_argument("--counts", type=int, nargs="+", default=[8], choices=range(2, len(CONCEPTS) + 1),
                        metavar="N", help="numbers of concepts fused, 2 to 8 (default: %(default)s)")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0],
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
    results = args.cache / "results" / f"{fingerprint}-{plan.key()}-{judge_key(JUDGE_PATH)}"
    base_ordinary = cached(results / "ordinary-base.json", lambda: {"all": ordinary_accuracy(base, judge, sampling)})
    lines = ["| concepts trained | N | prior weight | identity alone | identity fused | retention | fidelity fused | "
             "regional (latent) | ordinary scenes drawn right |", "|" + " --- |" * 9,
             f"| – | – | unfused base | – | – | – | – | – | {base_ordinary['all']:.2f} |"]
    concept_lines = ["| concepts trained | N | prior weight | " + " | ".join(f"`{name}`" for name in CONCEPTS) + " |",
                     "|" + " --- |" * (len(CONCEPTS) + 3)]
    captions = args.cache / "ordinary_captions.txt"  # the prior's captions, for the locality term to hold too
    atomic_write(captions, lambda tmp: tmp.write_text("\n".join(RECIPE.fuse_options()["prior_prompts"]) + "\n"))
    for training in args.trainings:
        changes = {"locality_captions": captions} if training == "locality-captions" else {}
        paths = train_concepts(args.cache, CONCEPTS, "additive", RECIPE.rank, plan, "toy", fingerprint, None,
                               changes=changes)
        suffix = "" if training == "recipe" else f"-{training}"  # the recipe's scores are fusion_quality.py's
        single = cached(results / f"single-additive-r{RECIPE.rank}{suffix}.json", evaluate_single, base, judge,
                        CONCEPTS, paths, sampling)["concepts"]
        concept_lines.append(f"| {training} | – | alone | " + " | ".join(
            f"{single[name]['identity']:.2f}" for name in CONCEPTS) + " |")
        for n in args.counts:
            names = CONCEPTS[:n]
            alone = sum(single[name]["identity"] for name in names) / n
            for weight in args.weights:
                fused = cached(results / f"ordinary-{training}-w{weight:g}-n{n}-s{args.seeds}.json", evaluate, base,
                               judge, names, paths[:n], weight, sampling)
                scores = fused["concepts"]
                identity = sum(scores[name]["identity"] for name in names) / n
                fidelity = sum(scores[name]["fidelity"] for name in names) / n
                regional = sum(fused["regional"]) / len(fused["regional"])
                lines.append(f"| {training} | {n} | {weight:g} | {alone:.2f} | {identity:.2f} | "
                             f"{retention(identity, alone):.2f} | {fidelity:.2f} | {regional:.2f} | "
                             f"{fused['ordinary']:.2f} |")
                concept_lines.append(f"| {training} | {n} | {weight:g} | " + " | ".join(
                    f"{scores[name]['identity']:.2f}" if name in scores else "–" for name in CONCEPTS) + " |")
                print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n\nIdentity per concept:\n\n" + "\n".join(concept_lines)
    print(table)
    if not args.no_write:
        write_report(
            args.out, "Ordinary prompts: the locality term's captions and closed-form fusion's prior weight",
            "ordinary_prompts.py", argv,
            f"Base `toy` (fingerprint {fingerprint}); the first N of the fusion benchmark's eight additive concepts, "
            f"trained by the recipe (`recipe`) or by the recipe with `--locality-captions` holding the prior's "
            f"{RECIPE.prior_captions} ordinary captions (`locality-captions`); fused with closed-form and those "
            f"{RECIPE.prior_captions} captions as the prior, at each prior weight; {args.seeds} seeds, "
            f"{sampling.steps} DPM++ steps, CFG {sampling.guidance:g}; regional: the benchmark's pairs, latent mode; "
            f"ordinary scenes: 64 captions of random scenes (seed 1000), one image each, all of shape, colour and "
            f"background right.", table)


if __name__ == "__main__":
    main()
