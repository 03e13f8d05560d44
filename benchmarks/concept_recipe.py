"""Which concept recipe keeps identity through fusion? A sweep on the toy world's bundled base.

    .venv/bin/python benchmarks/concept_recipe.py [--rows NAME ...] [--seeds K] [--cache DIR] [--out FILE]

Each row changes the toy recipe (`toyworld/recipe.py`) in one way (targets, learning rates, token vectors, the
locality term, steps, where the bands sit). For a row, the demo's three concepts are trained alone (concept i in
band i, or the row's bands), scored with their own model (live), then fused all three with the exact spectral sum and
with the closed-form text-side merge (with the recipe's prior: ordinary captions of the world), and scored again:
identity (the judge's probability of the concept on its own prompt), retention (fused / alone, summed over the
concepts) and prompt fidelity (a background no photo had).
Trained concepts and scores are cached under --cache, so an interrupted sweep continues where it stopped. Writes
the table to docs/results/concept_recipe.md unless --no-write.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from spectral_diffusion.compose import Composer
from spectral_diffusion.fingerprint import base_fingerprint
from spectral_diffusion.fusion import fuse
from spectral_diffusion.models import load_base
from spectral_diffusion.toyworld.demo import DEMO_CONCEPTS, write_photos
from spectral_diffusion.toyworld.judge import Judge
from spectral_diffusion.toyworld.recipe import RECIPE
from spectral_diffusion.toyworld.scoring import Sampling, retention, score_concept
from spectral_diffusion.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "results" / "concept_recipe.md"
FUSIONS = ("spectral", "closed-form")
# name -> (changes to the recipe's TrainConfig, bands of the three concepts); every row says its locality weight, so
# a row keeps its meaning when the recipe's default changes
OFF = {"locality_weight": 0.0}
ON = {"locality_weight": 1.0}
ROWS: dict[str, tuple[dict, tuple[int, int, int]]] = {
    "attn+ff+conv (the old recipe)": ({"targets": "attn+ff+conv", **OFF}, (0, 1, 2)),
    "attn (self- and cross-attention, text encoder)": ({"targets": "attn", **OFF}, (0, 1, 2)),
    "kv (cross-attention K/V, text-encoder attention)": ({"targets": "kv", **OFF}, (0, 1, 2)),
    "kv, locality 1": ({"targets": "kv", **ON}, (0, 1, 2)),
    "kv, locality 1, bands 5-7": ({"targets": "kv", **ON}, (5, 6, 7)),
    "kv, 4 token vectors": ({"targets": "kv", "num_vectors": 4, **OFF}, (0, 1, 2)),
    "kv, default rates (1e-3 / 1e-4, tokens 1e-3)": (
        {"targets": "kv", "lr_unet": 1e-3, "lr_text": 1e-4, "lr_emb": 1e-3, **OFF}, (0, 1, 2)),
    "cross-attention K/V only": ({"targets": "unet.*.attn2.to_[kv]", "lr_text": 0.0, **OFF}, (0, 1, 2)),
    "kv, locality 1, 1600 steps": ({"targets": "kv", "steps": 1600, **ON}, (0, 1, 2)),
    "kv, locality 1, rates 1e-2 / 3e-3": ({"targets": "kv", "lr_unet": 1e-2, "lr_text": 3e-3, **ON}, (0, 1, 2)),
    "kv, locality 1, 4 token vectors, tokens 1e-2": ({"targets": "kv", "num_vectors": 4, "lr_emb": 1e-2, **ON},
                                                    (0, 1, 2)),
}


def digest(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:10]


def train_row(cache: Path, changes: dict, bands: tuple[int, ...], base: str, fingerprint: str) -> dict[str, Path]:
    photos = write_photos(DEMO_CONCEPTS, cache / "photos")
    paths = {}
    for name, band in zip(DEMO_CONCEPTS, bands, strict=True):
        config = RECIPE.train_config(name, photos[name], "concept.safetensors", band=band, base=base, **changes)
        settings = {k: v for k, v in asdict(config).items() if k not in ("photo_dir", "out", "resume", "overwrite")}
        path = cache / "concepts" / fingerprint / f"{name}-b{band}-{digest(settings)}.safetensors"
        if not path.is_file():
            start = time.perf_counter()
            train(RECIPE.train_config(name, photos[name], path, band=band, base=base, **changes))
            print(f"trained {path.name} in {time.perf_counter() - start:.0f} s", flush=True)
        paths[name] = path
    return paths


def evaluate_row(base, judge: Judge, paths: dict[str, Path], sampling: Sampling) -> dict:
    composer = Composer(base)
    single = {}
    for name, path in paths.items():
        composer.set_concepts({path: 1.0})
        single[name] = score_concept(base, judge, name, sampling).to_dict()
    composer.clear()
    fused = {}
    for method in FUSIONS:
        pipe = copy.deepcopy(base)
        fuse(list(paths.values()), pipe, **RECIPE.fuse_options(method))
        fused[method] = {name: score_concept(pipe, judge, name, sampling).to_dict() for name in paths}
    return {"single": single, "fused": fused}


def row_line(name: str, scores: dict) -> str:
    single = scores["single"]
    alone = [single[c]["identity"] for c in DEMO_CONCEPTS]
    alone_fidelity = sum(single[c]["fidelity"] for c in DEMO_CONCEPTS) / len(DEMO_CONCEPTS)
    cells = [name, " / ".join(f"{v:.2f}" for v in alone), f"{alone_fidelity:.2f}"]
    for method in FUSIONS:
        fused = scores["fused"][method]
        ids = [fused[c]["identity"] for c in DEMO_CONCEPTS]
        fidelity = sum(fused[c]["fidelity"] for c in DEMO_CONCEPTS) / len(DEMO_CONCEPTS)
        cells += [" / ".join(f"{v:.2f}" for v in ids), f"{retention(sum(ids), sum(alone)):.2f}", f"{fidelity:.2f}"]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), metavar="ROW",
                        help="rows to run (default: all): " + "; ".join(ROWS))
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt (default: 8)")
    parser.add_argument("--steps", type=int, default=RECIPE.steps,
                        help="training steps per concept (default: the recipe's, %(default)s)")
    parser.add_argument("--base", default="toy", help="toy-world base model (default: toy)")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "concept_recipe",
                        help="trained concepts and scores (default: runs/concept_recipe)")
    parser.add_argument("--out", type=Path, default=DOC, help=f"results file (default: {DOC.relative_to(ROOT)})")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["SPECTRAL_DIFFUSION_CACHE"] = str(args.cache / "cache")  # its own SVD cache and band registry

    base = load_base(args.base, dtype=torch.float32)
    fingerprint = base_fingerprint(base.unet, base.text_encoder)
    judge = Judge.load()
    sampling = Sampling(n=args.seeds)
    lines = []
    for name in args.rows:
        changes, bands = ROWS[name]
        paths = train_row(args.cache, {"steps": args.steps, **changes}, bands, args.base, fingerprint)
        key = digest([str(p.name) for p in paths.values()] + [asdict(sampling)]
                     + [RECIPE.fuse_options(method) for method in FUSIONS])
        result_file = args.cache / "results" / f"{key}.json"
        if result_file.is_file():
            scores = json.loads(result_file.read_text())
        else:
            scores = evaluate_row(base, judge, paths, sampling)
            result_file.parent.mkdir(parents=True, exist_ok=True)
            result_file.write_text(json.dumps(scores, indent=1))
        lines.append(row_line(name, scores))
        print(lines[-1], flush=True)
    names = " / ".join(DEMO_CONCEPTS)
    head = (f"| row | identity alone ({names}) | fidelity alone | spectral: identity fused | retention | fidelity | "
            "closed-form: identity fused | retention | fidelity |\n|" + " --- |" * 9)
    table = "\n".join([head, *lines])
    print(table)
    if not args.no_write:
        command = "benchmarks/concept_recipe.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        text = (f"# Concept recipe sweep\n\nMade by `.venv/bin/python {command.strip()}` on "
                f"{datetime.now(timezone.utc):%Y-%m-%d}, base `{args.base}` (fingerprint {fingerprint}). Every row is "
                f"the toy recipe (`toyworld/recipe.py`: {RECIPE.targets}, rank {RECIPE.rank}, {args.steps} steps, "
                f"batch {RECIPE.batch_size}, UNet / text / token rates {RECIPE.lrs['additive'][0]:g} / "
                f"{RECIPE.lrs['additive'][1]:g} / {RECIPE.lr_emb:g}, additive) with the row's change; the demo's "
                f"three concepts fused together (N = 3); closed-form with the recipe's prior ({RECIPE.prior_captions} "
                f"ordinary captions, weight {RECIPE.prior_weight:g}); {args.seeds} seeds per prompt, {sampling.steps} "
                f"DPM++ steps, CFG {sampling.guidance:g}. Fidelity: the mean probability of the dotted background "
                f"when asked for it; retention: fused identity / alone identity, summed over the three.\n\n{table}\n")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
