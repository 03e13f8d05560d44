"""Fusion quality on the toy world: do fused concepts keep their identity, follow new prompts, stay apart?

    .venv/bin/python benchmarks/fusion_quality.py [--quick] [--steps N] [--seeds K] [--cache DIR] [--out FILE]

For N = 1, 2, 4, 8 concepts and four adapter kinds at a matched trainable-parameter budget (spectral additive,
spectral rotational, LoRA, orthogonal adaptation), each concept is trained alone (concept i in SVD band i for the
spectral kinds), then the first N are fused with every method that accepts the kind (spectral for spectral kinds;
closed-form with and without the recipe's prior captions, mean, sum, ties, dare, gradient for all), and a control:
each concept fused with the other N - 1 reduced to their token rows (zero weight changes), which must score as alone. The bundled judge reads the generated images:

- single identity: each concept with its own model (live composition), prompt on a training background;
- fused identity and retention (mean fused identity / mean single identity over the N concepts);
- prompt fidelity: background match when asked for a background no photo had (fused model);
- regional success: concepts 0 | 1 (and 2 | 3 from N = 4) side by side with regional prompts, the fraction of seeds
  in which the judge recognises both, each in its own half; in both region modes (cross-attention, latent windows).

Trained concepts are cached under --cache, keyed by concept, kind, rank, band, steps, seed, recipe and base
fingerprint, and so is every evaluated (kind, method, N): an interrupted run continues where it stopped and a
re-run only redoes what changed. Writes the table to docs/results/fusion_quality.md (between the results markers,
keeping the text around them) unless --quick or --no-write.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from spectral_diffusion.adapters import AdapterConfig, find_targets, inject_adapters, remove_adapters
from spectral_diffusion.adapters.config import SPECTRAL_VARIANTS
from spectral_diffusion.adapters.inject import trainable_parameters
from spectral_diffusion.adapters.layers import unwrap
from spectral_diffusion.atomic import atomic_write
from spectral_diffusion.bands import weight_matrix
from spectral_diffusion.compose import Composer
from spectral_diffusion.concept_file import Concept, load_concept
from spectral_diffusion.fingerprint import base_fingerprint
from spectral_diffusion.fusion import fuse
from spectral_diffusion.models import load_base
from spectral_diffusion.regional import REGION_MODES
from spectral_diffusion.toyworld.demo import write_photos
from spectral_diffusion.toyworld.judge import JUDGE_PATH, Judge
from spectral_diffusion.toyworld.recipe import RECIPE
from spectral_diffusion.toyworld.scoring import Sampling, retention, score_concept, score_regional
from spectral_diffusion.training.config import TrainConfig
from spectral_diffusion.training.trainer import locality_captions, locality_prompts, train

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "results" / "fusion_quality.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
# Eight concepts with eight different class words; concept i trains in band i.
CONCEPTS = ("striped_fish", "red_door_house", "bullseye", "swiss_cross", "spotted_star", "split_triangle",
            "hex_nut", "candy_heart")
KINDS = ("additive", "rotational", "lora", "ortho")
BASELINES = ("mean", "sum", "ties", "dare", "gradient")
# Each concept fused with the others reduced to their token rows (zero weight changes) by the exact sum: must score
# exactly as alone, or the pipeline (tokens, fusion, scoring) is at fault rather than interference.
CONTROL = "control"
HALF = "spectral@0.5"  # the exact sum with every concept at weight 0.5: smaller weights against interference
# closed-form with only what the concept files carry (class-word templates, captions without the token): what
# `spectral-diffusion fuse --method closed-form` does without --prior-prompts
NO_PRIOR = "closed-form (no prior)"


@dataclass(frozen=True)
class Plan:
    """What one run trains and samples."""

    counts: tuple[int, ...] = (1, 2, 4, 8)
    steps: int = RECIPE.steps
    seeds: int = 8
    sample_steps: int = 12
    batch_size: int = 4
    reference_rank: int = 4  # the additive rank whose trainable-parameter count every kind matches

    def key(self) -> str:
        """Digest of everything that changes an evaluation (not the counts: each N is cached on its own)."""
        data = {k: v for k, v in asdict(self).items() if k != "counts"}
        data["recipe"] = asdict(RECIPE)  # the fusion options (closed-form's prior) come from the recipe
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]


FULL = Plan()
QUICK = Plan(counts=(1, 2), steps=20, seeds=2, sample_steps=8)


def methods_for(kind: str) -> tuple[str, ...]:
    return (("spectral", HALF) if kind in SPECTRAL_VARIANTS else ()) + ("closed-form", NO_PRIOR) + BASELINES + (CONTROL,)


# ---- matched trainable-parameter budget -----------------------------------------------------------------------


def trainable_count(pipe: StableDiffusionPipeline, kind: str, rank: int) -> int:
    """Trainable adapter parameters of one concept of `kind` at `rank` on `pipe`'s recipe layers (token
    embeddings excluded: every kind trains the same rows)."""
    unet, text_encoder = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    wrappers = inject_adapters(unet, text_encoder, AdapterConfig(variant=kind, rank=rank, targets=RECIPE.targets))
    count = sum(p.numel() for p in trainable_parameters(wrappers, "default"))
    remove_adapters(unet, text_encoder)
    return count


def max_rank(pipe: StableDiffusionPipeline, kind: str, bands: int) -> int:
    """The largest rank for which `bands` disjoint bands fit every targeted layer (spectral kinds), else the
    smallest layer side."""
    targets = find_targets(pipe.unet, pipe.text_encoder, RECIPE.targets)
    sides = [min(weight_matrix(unwrap(m)).shape) for m in targets.values()]
    return min(sides) // bands if kind in SPECTRAL_VARIANTS else min(sides)


def matched_ranks(count: Callable[[str, int], int], kinds: Sequence[str], reference: tuple[str, int],
                  limits: dict[str, int]) -> dict[str, int]:
    """Per kind, the rank in 1..limits[kind] whose trainable count is closest (in ratio) to the reference's.

    Counts grow with the rank, so the search stops at the first rank at or above the target.
    """
    target = count(*reference)
    ranks = {}
    for kind in kinds:
        candidates = []
        for rank in range(1, limits[kind] + 1):
            candidates.append(rank)
            if count(kind, rank) >= target:
                break
        ranks[kind] = min(candidates, key=lambda r, kind=kind: abs(math.log(count(kind, r) / target)))
    return ranks


# ---- trained concepts, cached ----------------------------------------------------------------------------------


def _recipe_digest(config: TrainConfig) -> str:
    """Digest of every training setting except where files go: a changed default retrains."""
    settings = {k: v for k, v in asdict(config).items() if k not in ("photo_dir", "out", "resume", "overwrite")}
    # the base spec's fields under the names they had as TrainConfig fields, so concepts cached before keep their key
    base = settings.pop("base")
    settings.update(base=base["spec"], base_config=base["config"], allow_pickle=base["allow_pickle"],
                    device=base["device"], dtype=base["dtype"])
    settings["learning_rates"] = config.learning_rates()
    # what the trainer's locality term holds: the captions themselves, not their file's path; no key without them,
    # so concepts cached before the option existed keep their key
    settings["locality_prompts"] = locality_prompts(config)
    settings.pop("locality_captions")
    captions = locality_captions(config)
    if captions:
        settings["locality_captions"] = captions
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]


def train_concepts(cache: Path, names: Sequence[str], kind: str, rank: int, plan: Plan, base: str,
                   fingerprint: str, device: str | None, changes: Mapping[str, object] | None = None,
                   only: Collection[str] | None = None) -> list[Path]:
    """Each concept of `names` (index i: band i for spectral kinds, seed i), trained unless cached under
    `<cache>/concepts/<base fingerprint>/<concept>-<kind>-r<rank>-<band>-s<steps>-seed<i>-<recipe digest>`.
    `changes` override the recipe's TrainConfig fields, the seed too (a sweep row); `only` keeps just those names,
    each with the band and seed of its place in `names`."""
    photos = write_photos(names, cache / "photos")
    settings = {"rank": rank, "steps": plan.steps, "batch_size": plan.batch_size, **(changes or {})}
    paths = []
    for i, name in enumerate(names):
        if only is not None and name not in only:
            continue
        band = i if kind in SPECTRAL_VARIANTS else "auto"

        def config(out: Path, name: str = name, band: int | str = band, i: int = i) -> TrainConfig:
            return RECIPE.train_config(name, photos[name], out, **{
                "band": band, "variant": kind, "base": base, "device": device, "seed": i, **settings})

        probe = config(Path("c.safetensors"))
        stem = f"{name}-{kind}-r{probe.rank}-b{probe.band}-s{probe.steps}-seed{probe.seed}-{_recipe_digest(probe)}"
        path = cache / "concepts" / fingerprint / f"{stem}.safetensors"
        if not path.is_file():
            start = time.perf_counter()
            train(config(path))
            print(f"trained {path.name} in {time.perf_counter() - start:.0f} s", flush=True)
        paths.append(path)
    return paths


# ---- evaluation, cached per (kind, method, N) ------------------------------------------------------------------


def cached(path: Path, compute: Callable[..., dict], *args: object) -> dict:
    """`compute(*args)`, stored as JSON at `path` and read back from there on later runs."""
    if path.is_file():
        return json.loads(path.read_text())
    result = compute(*args)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return result


def regional_pairs(n: int) -> list[tuple[int, int]]:
    return [(i, i + 1) for i in range(0, min(n, 4) - 1, 2)]


def evaluate_single(pipe: StableDiffusionPipeline, judge: Judge, names: Sequence[str], paths: Sequence[Path],
                    sampling: Sampling) -> dict:
    composer = Composer(pipe)
    scores = {}
    for name, path in zip(names, paths, strict=True):
        composer.set_concepts({path: 1.0})
        scores[name] = score_concept(pipe, judge, name, sampling).to_dict()
    composer.clear()
    return {"concepts": scores}


def evaluate_control(base: StableDiffusionPipeline, judge: Judge, names: Sequence[str], paths: Sequence[Path],
                     sampling: Sampling) -> dict:
    """Each concept fused (exact sum) with the others reduced to their token rows: its identity must not move."""
    concepts = [load_concept(p) for p in paths]
    scores, seconds = {}, 0.0
    for i, name in enumerate(names):
        pipe = copy.deepcopy(base)
        others = [Concept(c.meta, {}, c.token_embeddings) for j, c in enumerate(concepts) if j != i]
        seconds += fuse([concepts[i], *others], pipe, method="sum").seconds
        scores[name] = score_concept(pipe, judge, name, sampling).to_dict()
    return {"concepts": scores, "regional": [], "fuse_seconds": seconds}


def evaluate_fused(base: StableDiffusionPipeline, judge: Judge, names: Sequence[str], paths: Sequence[Path],
                   method: str, sampling: Sampling) -> dict:
    if method == CONTROL:
        return evaluate_control(base, judge, names, paths, sampling)
    pipe = copy.deepcopy(base)
    if method == HALF:
        report = fuse(list(paths), pipe, method="spectral", weights=[0.5] * len(paths))
    elif method == NO_PRIOR:
        report = fuse(list(paths), pipe, method="closed-form")
    else:
        report = fuse(list(paths), pipe, **RECIPE.fuse_options(method))
    scores = {name: score_concept(pipe, judge, name, sampling).to_dict() for name in names}
    regional = [score_regional(pipe, judge, names[a], names[b], sampling, mode=mode).to_dict()
                for a, b in regional_pairs(len(names)) for mode in REGION_MODES]
    return {"concepts": scores, "regional": regional, "fuse_seconds": report.seconds}


@dataclass
class Row:
    n: int
    kind: str
    method: str
    single_identity: float
    fused_identity: float
    retention: float
    single_fidelity: float
    fused_fidelity: float
    regional: dict[str, float]  # region mode -> success (empty below N = 2)
    fuse_seconds: float


def summarise(n: int, kind: str, method: str, single: dict, fused: dict) -> Row:
    """Means over the fused concepts; retention is the ratio of the mean identities (robust to a concept that its
    own model barely learned)."""
    names = list(fused["concepts"])
    mean = lambda scores, key: sum(scores[c][key] for c in names) / len(names)  # noqa: E731
    single_id, fused_id = mean(single["concepts"], "identity"), mean(fused["concepts"], "identity")
    regional = {}
    for mode in REGION_MODES:
        successes = [r["success"] for r in fused["regional"] if r["mode"] == mode]
        if successes:
            regional[mode] = sum(successes) / len(successes)
    return Row(n, kind, method, single_id, fused_id, retention(fused_id, single_id),
               mean(single["concepts"], "fidelity"), mean(fused["concepts"], "fidelity"), regional,
               fused["fuse_seconds"])


def markdown_table(rows: Sequence[Row]) -> str:
    modes = " | ".join(f"regional ({mode})" for mode in REGION_MODES)
    head = (f"| N | kind | method | identity single | identity fused | retention | fidelity single | "
            f"fidelity fused | {modes} | fuse s |\n|" + " --- |" * (9 + len(REGION_MODES)))
    lines = [head]
    for r in rows:
        regional = " | ".join("–" if mode not in r.regional else f"{r.regional[mode]:.2f}" for mode in REGION_MODES)
        lines.append(f"| {r.n} | {r.kind} | {r.method} | {r.single_identity:.2f} | {r.fused_identity:.2f} | "
                     f"{r.retention:.2f} | {r.single_fidelity:.2f} | {r.fused_fidelity:.2f} | {regional} | "
                     f"{r.fuse_seconds:.1f} |")
    return "\n".join(lines)


def write_results(path: Path, section: str) -> None:
    """Put `section` between the results markers of `path`, keeping what is around them (the discussion)."""
    block = f"{START}\n{section}\n{END}"
    text = path.read_text() if path.is_file() else "# Fusion quality on the toy world\n\n" + block + "\n"
    text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S) \
        if START in text else text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_report(out: Path, title: str, script: str, argv: Sequence[str] | None, setup: str, body: str) -> None:
    """A results page of one run: `title`, the command that made it (`script` with the run's arguments: `argv`, or
    the command line's), the date and machine, `setup`, then `body`; written atomically."""
    command = f"benchmarks/{script} " + shlex.join(sys.argv[1:] if argv is None else argv)
    text = (f"# {title}\n\nMade by `.venv/bin/python {command.strip()}` on {datetime.now(timezone.utc):%Y-%m-%d} "
            f"({machine()}). {setup}\n\n{body}\n")
    atomic_write(out, lambda tmp: tmp.write_text(text))
    print(f"wrote {out}")


def judge_key(path: Path) -> str:
    """Digest of the judge's weights: scores read by another judge are not reused."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:8]


def add_run_arguments(parser: argparse.ArgumentParser, doc: Path, cache: Path, cache_help: str) -> None:
    """--cache, --out, --no-write and --threads, as every toy-world benchmark script that writes one table takes them."""
    parser.add_argument("--cache", type=Path, default=cache, help=f"{cache_help} (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=doc, help=f"results file (default: {doc.relative_to(ROOT)})")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")


def start_run(args: argparse.Namespace) -> None:
    """Torch threads as asked, and an SVD cache and band registry of the run's own under --cache (a benchmark's
    concepts must not take bands from the user's)."""
    torch.set_num_threads(args.threads)
    os.environ["SPECTRAL_DIFFUSION_CACHE"] = str(args.cache / "cache")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {torch.get_num_threads()} torch threads{gpu}; torch {torch.__version__}"


def run(args: argparse.Namespace) -> list[Row]:
    plan = QUICK if args.quick else FULL
    plan = Plan(plan.counts, args.steps or plan.steps, args.seeds or plan.seeds, plan.sample_steps, plan.batch_size,
                plan.reference_rank)
    names = CONCEPTS[: max(plan.counts)]
    judge = Judge.load(args.judge)
    base = load_base(args.base, device=args.device, dtype=torch.float32)  # fp32 on a GPU too: fused weights exact
    fingerprint = base_fingerprint(base.unet, base.text_encoder)
    limits = {kind: max_rank(base, kind, len(CONCEPTS)) for kind in KINDS}
    counts = {}

    def count(kind: str, rank: int) -> int:
        if (kind, rank) not in counts:
            counts[kind, rank] = trainable_count(base, kind, rank)
        return counts[kind, rank]

    ranks = matched_ranks(count, KINDS, ("additive", plan.reference_rank), limits)
    budget = "; ".join(f"{k} rank {r}: {count(k, r):,} trainable" for k, r in ranks.items())
    print(f"matched budget: {budget}", flush=True)
    sampling = Sampling(steps=plan.sample_steps, n=plan.seeds)
    results = args.cache / "results" / f"{fingerprint}-{plan.key()}-{judge_key(args.judge)}"
    rows, missing = [], []
    for kind in args.kinds:
        single_file = results / f"single-{kind}-r{ranks[kind]}.json"
        if args.from_cache and not single_file.is_file():
            missing.append(kind)
            continue
        paths = [] if args.from_cache else train_concepts(args.cache, names, kind, ranks[kind], plan, args.base,
                                                           fingerprint, args.device)
        single = cached(single_file, evaluate_single, base, judge, names, paths, sampling)
        for n in plan.counts:
            for method in methods_for(kind):
                fused_file = results / f"{kind}-r{ranks[kind]}-{method}-n{n}.json"
                if args.from_cache and not fused_file.is_file():
                    missing.append(f"N={n} {kind} {method}")
                    continue
                start = time.perf_counter()
                fused = cached(fused_file, evaluate_fused, base, judge, names[:n], paths[:n], method, sampling)
                rows.append(summarise(n, kind, method, single, fused))
                print(f"N={n} {kind} {method}: identity {rows[-1].fused_identity:.2f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
    rows.sort(key=lambda r: (r.n, KINDS.index(r.kind), methods_for(r.kind).index(r.method)))
    table = markdown_table(rows)
    print(table)
    if not (args.quick or args.no_write) or args.out:
        command = "benchmarks/fusion_quality.py " + shlex.join(sys.argv[1:])
        section = "\n".join([
            f"Made by `.venv/bin/python {command.strip()}` on {datetime.now(timezone.utc):%Y-%m-%d} ({machine()}).",
            f"Base: `{args.base}` (fingerprint {fingerprint}); {plan.steps} training steps per concept, batch "
            f"{plan.batch_size}, the toy recipe (`toyworld/recipe.py`: {RECIPE.targets}, learning rates per kind); "
            f"{plan.seeds} seeds per prompt, {plan.sample_steps} DPM++ steps, CFG 5. Matched budget "
            f"({RECIPE.targets} layers): {budget}.",
            "", table] + ([f"\nNot evaluated (not in the cache): {', '.join(missing)}."] if missing else []))
        write_results(args.out or DOC, section)
        print(f"wrote {args.out or DOC}")
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 1, 2, few steps and seeds (minutes; no doc write)")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps per concept (default: {FULL.steps})")
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds per prompt (default: {FULL.seeds})")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                        help="adapter kinds to run (default: all); separate processes can run one kind each on the "
                             "same --cache, and a last run with all kinds assembles the table from the cache")
    parser.add_argument("--base", default="toy", help="toy-world base model (default: toy)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "fusion_quality",
                        help="trained concepts and evaluations (default: runs/fusion_quality)")
    parser.add_argument("--out", type=Path, default=None, help=f"results file (default: {DOC.relative_to(ROOT)})")
    parser.add_argument("--judge", type=Path, default=JUDGE_PATH, help="judge weights (default: the bundled judge)")
    parser.add_argument("--from-cache", action="store_true",
                        help="train and evaluate nothing: build the table from the cached evaluations only")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    args = parser.parse_args(argv)
    start_run(args)
    return run(args)


if __name__ == "__main__":
    main()
