"""Sampling step time with N live concepts: per-step low-rank corrections vs one merged dense weight, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_live.py [--bases toy sd15] [--sd15-size 256] [--repeats 3]

For each base (`toy`: the bundled toy model; `sd15`: SD 1.5-shaped random weights, `testing/sd15.py`) and N = 0, 1,
2, 4, 8 synthetic additive concepts (`attn+ff` targets, bands 0..N-1), `compose.Composer` makes them live with
`merge=False` (every wrapper adds each concept's correction per step) and with `merge=True` (the default: one dense
`W + sum w_i dW_i` per layer, built on the first step after a change). A step is one UNet forward with classifier-free
guidance (batch 2); times are the median process CPU seconds of `--repeats` steps after one warm-up step, whose
extra cost over a step is reported as the merge. Ratios are to the base step (N = 0) of the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from spectral_diffusion.compose import Composer
from spectral_diffusion.concept_file import save_concept
from spectral_diffusion.models import load_base
from spectral_diffusion.testing.sd15 import sd15_pipeline
from spectral_diffusion.testing.tiny_sd import random_concept

COUNTS = (0, 1, 2, 4, 8)


def step_seconds(pipe: StableDiffusionPipeline, latents: torch.Tensor, text: torch.Tensor, repeats: int
                 ) -> tuple[float, float]:
    """(warm-up step, median step) in process CPU seconds."""
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.process_time()
            pipe.unet(latents, 500, text)
            times.append(time.process_time() - start)
    return times[0], statistics.median(times[1:])


def bench(name: str, pipe: StableDiffusionPipeline, size: int, rank: int, repeats: int) -> None:
    gen = torch.Generator().manual_seed(0)
    side = size // pipe.vae_scale_factor
    latents = torch.randn(2, pipe.unet.config.in_channels, side, side, generator=gen)
    text = torch.randn(2, 77, pipe.text_encoder.config.hidden_size, generator=gen)
    folder = Path(tempfile.mkdtemp(prefix="bench-live-"))
    paths = [save_concept(folder / f"c{i}.safetensors",
                          random_concept(pipe, rank=rank, band=i, targets="attn+ff", token=f"<c{i}>", seed=i))
             for i in range(max(COUNTS))]
    _, base = step_seconds(pipe, latents, text, repeats)
    print(f"\n### {name}: {size} px, rank {rank}, attn+ff, CFG batch 2; base step {base:.3f} s CPU\n")
    print("| live concepts | live path s | merged s | live / base | merged / base | merge (first step extra) s |")
    print("|---|---|---|---|---|---|")
    print(f"| 0 | {base:.3f} | {base:.3f} | 1.00 | 1.00 | - |", flush=True)
    for n in COUNTS[1:]:
        row = {}
        for merge in (False, True):
            composer = Composer(pipe, merge=merge)
            composer.set_concepts({p: 1.0 for p in paths[:n]})
            row[merge] = step_seconds(pipe, latents, text, repeats)
            composer.clear()
        warm, merged = row[True]
        print(f"| {n} | {row[False][1]:.3f} | {merged:.3f} | {row[False][1] / base:.2f} | {merged / base:.2f} | "
              f"{warm - merged:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bases", nargs="+", default=["toy", "sd15"])
    parser.add_argument("--sd15-size", type=int, default=256, help="image side in px for SD 1.5 shapes")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name in args.bases:
        if name == "toy":
            pipe = load_base("toy", device="cpu", dtype=torch.float32)
            bench("toy base", pipe, pipe.unet.config.sample_size * pipe.vae_scale_factor, 4, args.repeats)
        else:
            bench("SD 1.5 shapes", sd15_pipeline(), args.sd15_size, 8, args.repeats)


if __name__ == "__main__":
    main()
