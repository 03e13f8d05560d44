"""First run on a new base: exact vs randomized band SVD of the SD 1.5 `attn+ff` targets, measured side by side.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_svd.py [--k 64] [--rank 8] [--layers N] [--kinds ...]

SD 1.5's UNet + CLIP text encoder are built on the meta device and their 264 target weights filled with random
fp32 values of two kinds: `decaying` (singular values falling like i^-1/2, as trained weights' do; W = G1 diag(d) G2
with Gaussian G1, G2) and `gaussian` (a flat spectrum, the randomized SVD's worst case, where its residual check
sends layers to the exact SVD). For each kind: a cold `SVDCache(method=...).band_svd(targets, k)` into an empty
folder for both methods (digest + SVD + write, process CPU seconds on one thread), then the bands compared: the
largest principal angle between exact and randomized band i (rank-wide columns) over all layers, and the relative
change of a synthetic additive concept's weight change (random A, B, c, the same for both) when built on the
randomized instead of the exact band.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from torch import nn

from spectral_diffusion.adapters.layers import delta_factors
from spectral_diffusion.adapters.targets import find_targets
from spectral_diffusion.bands import band_angles, band_columns, weight_matrix
from spectral_diffusion.svd_cache import SVDCache
from spectral_diffusion.testing.sd15 import sd15_pipeline


def targets(kind: str, limit: int | None) -> dict[str, nn.Module]:
    """The SD 1.5 `attn+ff` targets (about `limit` of them, evenly spaced, if given) with random weights of `kind`."""
    pipe = sd15_pipeline(device="meta")
    found = find_targets(pipe.unet, pipe.text_encoder, "attn+ff")
    chosen = dict(list(found.items())[:: len(found) // limit]) if limit else found
    gen = torch.Generator().manual_seed(0)
    for module in chosen.values():
        shape = module.weight.shape
        out_f, in_f = shape[0], module.weight[0].numel()
        if kind == "gaussian":
            w = torch.randn(out_f, in_f, generator=gen)
        else:
            m = min(out_f, in_f)
            spectrum = (torch.arange(m) + 1.0) ** -0.5
            w = (torch.randn(out_f, m, generator=gen) * spectrum) @ torch.randn(m, in_f, generator=gen)
        module.weight = nn.Parameter((w / in_f**0.5).reshape(shape), requires_grad=False)
    return chosen


def cpu_seconds(fn) -> tuple[float, object]:
    start = time.process_time()
    result = fn()
    return time.process_time() - start, result


def concept_change(exact: tuple, fast: tuple, band: int, rank: int, gen: torch.Generator) -> float:
    """|dW(randomized band) - dW(exact band)| / |dW(exact band)| for one random additive adapter state."""
    cols = band_columns(band, rank)
    u, s, v = exact
    trainables = {"A": 0.1 * torch.randn(u.shape[0], rank, generator=gen),
                  "B": 0.1 * torch.randn(v.shape[0], rank, generator=gen), "c": 0.1 * torch.randn(rank, generator=gen)}

    def dense(svd: tuple) -> torch.Tensor:
        up, down = delta_factors("additive", {"U": svd[0][:, cols], "S": svd[1][cols], "V": svd[2][:, cols],
                                              **trainables})
        return up @ down

    reference = dense(exact)
    return float((dense(fast) - reference).norm() / reference.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--layers", type=int, default=None, help="about N targets only (for a quick check)")
    parser.add_argument("--kinds", nargs="+", default=["decaying", "gaussian"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for kind in args.kinds:
        layers = targets(kind, args.layers)
        wide = sum(min(weight_matrix(m).shape) >= 512 for m in layers.values())
        results, seconds, caches = {}, {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for method in ("exact", "randomized"):
                caches[method] = SVDCache(f"{tmp}/{method}", method=method)
                seconds[method], results[method] = cpu_seconds(lambda c=caches[method], ls=layers: c.band_svd(ls, args.k))
        bands = args.k // args.rank
        angles = torch.stack([band_angles(results["exact"][n][0], results["randomized"][n][0], args.rank)
                              for n in layers])  # [layers, bands]
        gen = torch.Generator().manual_seed(1)
        changes = torch.tensor([[concept_change(results["exact"][n], results["randomized"][n], b, args.rank, gen)
                                 for b in range(bands)] for n in layers])
        print(f"\n### {kind} weights: {len(layers)} layers ({wide} with min(out, in) >= 512), k = {args.k}\n")
        print("| method | CPU s | layers randomized | fallbacks to exact |\n|---|---|---|---|")
        fast = caches["randomized"]
        print(f"| exact | {seconds['exact']:.1f} | 0 | - |")
        randomized = sum(bool((results["randomized"][n][1] != results["exact"][n][1]).any()) for n in layers)
        print(f"| randomized | {seconds['randomized']:.1f} | {randomized} | {fast.fallbacks} |")
        print(f"| exact / randomized | {seconds['exact'] / seconds['randomized']:.1f}x | | |")
        print(f"\n| band (rank {args.rank}) | max angle, deg | median angle, deg | max concept dW change | "
              "median dW change |\n|---|---|---|---|---|")
        for b in range(bands):
            print(f"| {b} | {angles[:, b].max().rad2deg():.3f} | {angles[:, b].median().rad2deg():.3f} | "
                  f"{changes[:, b].max():.1e} | {changes[:, b].median():.1e} |", flush=True)


if __name__ == "__main__":
    main()
