"""Does the toy recipe learn every held-out concept alone? Identity and prompt fidelity of each of the world's
concepts, trained by the recipe (additive) and applied live on the bundled base.

    .venv/bin/python benchmarks/concept_identity.py [--steps N] [--set FIELD=VALUE ...] [--only NAME ...]
        [--concepts NAME ...] [--seeds K] [--cache DIR] [--base toy] [--out FILE]

The fusion benchmark's eight concepts are trained exactly as there (concept i in band i, seed i; the same cache, so
neither script trains them twice); the other concepts form a second group numbered from 0. `--concepts` trains and
scores the named concepts as one group instead; `--only` keeps just the named concepts, each with its band and seed
from the default groups. `--set` changes a field of the recipe's TrainConfig (a sweep row, e.g. `--set rank=8`).
Scores as in the fusion benchmark (`toyworld/scoring.py`): identity = the judge's probability of the concept on its
own prompt; fidelity = the probability of a background no photo had, when asked for. Writes docs/results/concept_identity.md unless
--no-write.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import fields
from pathlib import Path

import torch
from fusion_quality import (
    CONCEPTS,
    FULL,
    ROOT,
    Plan,
    add_run_arguments,
    cached,
    evaluate_single,
    judge_key,
    start_run,
    train_concepts,
    write_report,
)

from spectral_diffusion.fingerprint import base_fingerprint
from spectral_diffusion.models import load_base
from spectral_diffusion.toyworld import concepts
from spectral_diffusion.toyworld.judge import JUDGE_PATH, Judge
from spectral_diffusion.toyworld.recipe import RECIPE
from spectral_diffusion.toyworld.scoring import Sampling
from spectral_diffusion.training.config import TrainConfig

FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}

DOC = ROOT / "docs" / "results" / "concept_identity.md"
GOAL = 0.9


def recipe_change(text: str) -> tuple[str, object]:
    """`FIELD=VALUE` for a TrainConfig field, VALUE parsed as the field's type (a number where it takes one)."""
    key, sep, value = text.partition("=")
    if not sep or key not in FIELD_TYPES:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE with a TrainConfig field, got {text!r}")
    for kind, parse in (("int", int), ("float", float)):
        if kind in FIELD_TYPES[key].split(" | "):
            try:
                return key, parse(value)
            except ValueError:
                pass
    return key, value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=FULL.steps, help="training steps (default: the recipe's, %(default)s)")
    parser.add_argument("--concepts", nargs="+", choices=list(concepts.CONCEPTS), default=None, metavar="NAME",
                        help="score these concepts as one group (default: every concept, in two groups)")
    parser.add_argument("--only", nargs="+", choices=list(concepts.CONCEPTS), default=None, metavar="NAME",
                        help="train and score only these concepts, each with its band and seed in the default groups")
    parser.add_argument("--set", type=recipe_change, action="append", default=[], metavar="FIELD=VALUE",
                        help="change a field of the recipe's TrainConfig (repeatable)")
    parser.add_argument("--seeds", type=int, default=FULL.seeds, help="seeds per prompt (default: %(default)s)")
    parser.add_argument("--base", default="toy", help="toy-world base model (default: toy)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--judge", type=Path, default=JUDGE_PATH, help="judge weights (default: the bundled judge)")
    add_run_arguments(parser, DOC, ROOT / "runs" / "fusion_quality",
                      "trained concepts and scores, shared with fusion_quality.py")
    args = parser.parse_args(argv)
    start_run(args)

    judge = Judge.load(args.judge)
    base = load_base(args.base, device=args.device, dtype=torch.float32)
    fingerprint = base_fingerprint(base.unet, base.text_encoder)
    sampling = Sampling(steps=FULL.sample_steps, n=args.seeds)
    plan = Plan(steps=args.steps)
    changes = dict(args.set)
    row = "-" + hashlib.sha256(json.dumps(changes, sort_keys=True).encode()).hexdigest()[:8] if changes else ""
    results = args.cache / "results" / f"{fingerprint}-{plan.key()}{row}-{judge_key(args.judge)}"
    groups = ((tuple(args.concepts),) if args.concepts else
              (CONCEPTS, tuple(name for name in concepts.CONCEPTS if name not in CONCEPTS)))
    scores = {}
    for names in groups:
        paths = train_concepts(args.cache, names, "additive", RECIPE.rank, plan, args.base, fingerprint, args.device,
                               changes, args.only)
        names = [name for name in names if args.only is None or name in args.only]
        if names:
            scores.update(cached(results / f"alone-{'-'.join(names)}-s{args.seeds}.json", evaluate_single, base,
                                 judge, names, paths, sampling)["concepts"])
    lines = ["| concept | class word | identity alone | fidelity alone |", "| --- | --- | --- | --- |"]
    for name, score in scores.items():
        lines.append(f"| `{name}` | {concepts.CONCEPTS[name].class_word} | {score['identity']:.2f} | "
                     f"{score['fidelity']:.2f} |")
    learned = sum(score["identity"] >= GOAL for score in scores.values())
    mean = sum(score["identity"] for score in scores.values()) / len(scores)
    lines.append(f"\n{learned} of {len(scores)} concepts at identity >= {GOAL}; mean identity {mean:.2f}.")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_report(
            args.out, "Every toy concept, learned alone", "concept_identity.py", argv,
            f"Base `{args.base}` (fingerprint {fingerprint}); each concept trained by the toy recipe "
            f"(`toyworld/recipe.py`: additive, {RECIPE.targets}, rank {RECIPE.rank}, {args.steps} steps, locality "
            f"weight {RECIPE.locality_weight:g}{''.join(f', {k} {v}' for k, v in changes.items())}) and applied live; "
            f"{args.seeds} seeds per prompt, {sampling.steps} DPM++ steps, CFG {sampling.guidance:g}. Fidelity: the "
            f"probability of the dotted background when asked for it.", table)


if __name__ == "__main__":
    main()
