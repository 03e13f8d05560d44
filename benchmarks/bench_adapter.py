"""Adapter forward+backward cost on SD 1.5 layer shapes, and cold vs cached band SVD of the whole SD 1.5.

Compares, at the same rank, on real SD 1.5 shapes with random weights (CPU, fp32, batch 1):
  additive / rotational  spectral_diffusion's AdapterLayer (band correction through exact factors)
  peft-lora              PEFT's LoRA on the same nn.Linear / nn.Conv2d (get_peft_model)
  rebuild-W              the paper's reference approach: keep full U, s, V and rebuild W every call
Times are medians over interleaved rounds (every variant measured once per round, in turn) of the process
CPU time, which a CPU shared with other jobs disturbs far less than wall time (also shown). Memory is
the peak-RSS growth of a fresh subprocess running one forward+backward (``ru_maxrss``), and the bytes
autograd saves for backward inside the layer (saved-tensor hooks; inputs and weights excluded).

    .venv/bin/python benchmarks/bench_adapter.py [--rank 8] [--rounds 5] [--threads 1] [--skip-svd]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from spectral_diffusion.adapters import AdapterConfig, AdapterLayer, find_targets
from spectral_diffusion.adapters.layers import Adapter, create_adapter
from spectral_diffusion.bands import oriented_svd, weight_matrix
from spectral_diffusion.svd_cache import SVDCache

VARIANTS = ("additive", "rotational", "peft-lora", "rebuild-W")


@dataclass(frozen=True)
class LayerSpec:
    name: str
    in_features: int
    out_features: int
    tokens: int
    count: int  # how many layers of the SD 1.5 attn+ff target set have this shape and token count
    conv: bool = False


def _sd15_layers() -> tuple[LayerSpec, ...]:
    """Every distinct (shape, tokens) of SD 1.5's attn+ff targets at 512 px, batch 1, with its layer count.

    Each channel level has 5 transformer blocks (2 down, 3 up; 1 in the middle at 8x8): per block 6
    ``c -> c`` attention projections, cross-attention K/V from the 77 x 768 context, GEGLU in (``c -> 8c``),
    ff out (``4c -> c``), and 2 pointwise convs (proj_in/proj_out) per transformer. CLIP: 12 layers.
    """
    specs = []
    for level, (c, tokens, blocks) in {
        "64x64": (320, 4096, 5),
        "32x32": (640, 1024, 5),
        "16x16": (1280, 256, 5),
        "mid 8x8": (1280, 64, 1),
    }.items():
        specs += [
            LayerSpec(f"{level} attn q/k/v/out", c, c, tokens, 6 * blocks),
            LayerSpec(f"{level} attn2.to_k/v", 768, c, 77, 2 * blocks),
            LayerSpec(f"{level} ff.net.0.proj", c, 8 * c, tokens, blocks),
            LayerSpec(f"{level} ff.net.2", 4 * c, c, tokens, blocks),
            LayerSpec(f"{level} proj_in/out (1x1 conv)", c, c, tokens, 2 * blocks, conv=True),
        ]
    specs += [
        LayerSpec("text q/k/v/out_proj", 768, 768, 77, 48),
        LayerSpec("text fc1", 768, 3072, 77, 12),
        LayerSpec("text fc2", 3072, 768, 77, 12),
    ]
    assert sum(s.count for s in specs if not s.name.startswith("text")) == 160 + 32
    return tuple(specs)


LAYERS = _sd15_layers()


class RebuildW(nn.Module):
    """The reference code's adapter: full U, s, V kept; ``W' = U' diag(s') V'^T`` rebuilt on every call."""

    def __init__(self, base: nn.Module, rank: int) -> None:
        super().__init__()
        self.base, self.rank = base, rank
        weight = weight_matrix(base)
        # Cached so that the memory-probe subprocesses do not recompute it (main() points the cache at a temp dir).
        u, s, v = SVDCache().band_svd({"w": base}, min(weight.shape))["w"]
        self.register_buffer("u", u)
        self.register_buffer("s", s)
        self.register_buffer("v", v)
        self.a = nn.Parameter(torch.zeros(weight.shape[0], rank))
        self.b = nn.Parameter(torch.zeros(weight.shape[1], rank))
        self.c = nn.Parameter(torch.zeros(rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rank
        u = torch.cat([self.u[:, :r] + self.a, self.u[:, r:]], dim=1)
        s = torch.cat([self.s[:r] + self.c, self.s[r:]])
        v = torch.cat([self.v[:, :r] + self.b, self.v[:, r:]], dim=1)
        weight = (u * s) @ v.T
        if isinstance(self.base, nn.Conv2d):
            return F.conv2d(x, weight[:, :, None, None], self.base.bias)
        return F.linear(x, weight, self.base.bias)


def build(spec: LayerSpec, variant: str, rank: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The adapted layer (nonzero trainables), an input that requires grad, and an output gradient."""
    torch.manual_seed(0)  # the base weight: identical in the memory-probe subprocesses
    gen = torch.Generator().manual_seed(0)
    if spec.conv:
        base: nn.Module = nn.Conv2d(spec.in_features, spec.out_features, kernel_size=1)
        side = round(spec.tokens**0.5)
        x = torch.randn(1, spec.in_features, side, side, generator=gen)
    else:
        base = nn.Linear(spec.in_features, spec.out_features)
        x = torch.randn(1, spec.tokens, spec.in_features, generator=gen)
    base.requires_grad_(False)
    if variant in ("additive", "rotational"):
        u, s, v = oriented_svd(weight_matrix(base), rank)
        adapter: Adapter = create_adapter(
            AdapterConfig(variant=variant, rank=rank), spec.name, (0, 0), (u, s, v)
        )
        module: nn.Module = AdapterLayer(base)
        module.add_adapter("default", adapter)
    elif variant == "peft-lora":
        from peft import LoraConfig, get_peft_model

        holder = nn.Module()
        holder.layer = base
        module = get_peft_model(
            holder, LoraConfig(r=rank, lora_alpha=rank, target_modules=["layer"])
        ).base_model.model
        module = module.layer
    elif variant == "rebuild-W":
        module = RebuildW(base, rank)
    else:
        raise ValueError(variant)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.01, generator=gen)
    out_shape = (1, spec.out_features, *x.shape[2:]) if spec.conv else (1, spec.tokens, spec.out_features)
    return module, x.requires_grad_(True), torch.randn(out_shape, generator=gen)


def step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    """One training-style forward + backward (input gradient included, as inside a network)."""
    for p in module.parameters():
        p.grad = None
    x.grad = None
    module(x).backward(grad)


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward that the layer itself allocated (not the input or weights)."""
    existing = {t.untyped_storage().data_ptr() for t in (x, *module.parameters(), *module.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in existing:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(saved.values())


def _proc_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(key + ":")).split()[1])


def probe_rss(variant: str, rank: int) -> None:
    """Subprocess entry: for each layer, print the peak-RSS growth (bytes) of one forward+backward.

    After a warm-up step, freed memory is handed back to the OS and the kernel's high-water mark reset, so
    the figure is what one steady-state step touches, not what an earlier layer or the setup did.
    """
    libc = ctypes.CDLL("libc.so.6")
    growth = []
    for spec in LAYERS:
        module, x, grad = build(spec, variant, rank)
        step(module, x, grad)  # one-time allocations (thread pools, kernel caches) are not the layer's cost
        gc.collect()
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset VmHWM to the current RSS
        before = _proc_kib("VmRSS")
        step(module, x, grad)
        growth.append((_proc_kib("VmHWM") - before) * 1024)
        del module, x, grad
    print(json.dumps(growth))


def rss_growth(variant: str, rank: int, threads: int) -> list[int]:
    cmd = [sys.executable, __file__, "--probe", variant, "--rank", str(rank), "--threads", str(threads)]
    return json.loads(
        subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    )


def bench_layers(rank: int, rounds: int, threads: int) -> None:
    mib = 2**20
    print(
        f"\n## Adapter forward+backward (rank {rank}, fp32, CPU, {threads} thread(s), "
        f"median of {rounds} interleaved rounds, process CPU time in ms)\n"
    )
    print(
        "| layer (in -> out, tokens) | count | "
        + " | ".join(VARIANTS)
        + " | additive / lora | rotational / lora "
        "| rebuild-W / lora | additive / lora (wall) |"
    )
    print("|" + "---|" * (len(VARIANTS) + 6))
    totals = {v: 0.0 for v in VARIANTS}
    wall_totals = {v: 0.0 for v in VARIANTS}
    saved_rows = []
    for spec in LAYERS:
        built = {v: build(spec, v, rank) for v in VARIANTS}
        repeats = {}
        for v in VARIANTS:
            start = time.perf_counter()
            step(*built[v])  # warm-up, and the repeat count that makes one sample last >= 30 ms
            repeats[v] = max(1, round(0.03 / (time.perf_counter() - start)))
        cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
        wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(rounds):
            for v in VARIANTS:
                start_cpu, start_wall = time.process_time(), time.perf_counter()
                for _ in range(repeats[v]):
                    step(*built[v])
                cpu[v].append((time.process_time() - start_cpu) / repeats[v])
                wall[v].append((time.perf_counter() - start_wall) / repeats[v])
        ms = {v: 1e3 * statistics.median(cpu[v]) for v in VARIANTS}
        wall_ms = {v: 1e3 * statistics.median(wall[v]) for v in VARIANTS}
        for v in VARIANTS:
            totals[v] += spec.count * ms[v]
            wall_totals[v] += spec.count * wall_ms[v]
        print(
            f"| {spec.name} ({spec.in_features} -> {spec.out_features}, {spec.tokens}) | {spec.count} | "
            + _cells(ms, wall_ms),
            flush=True,
        )
        saved_rows.append({v: saved_bytes(built[v][0], built[v][1]) for v in VARIANTS})
        del built
    print(
        f"| **all {sum(s.count for s in LAYERS)} layers, count-weighted** | | " + _cells(totals, wall_totals)
    )

    rss = {v: rss_growth(v, rank, threads) for v in VARIANTS}
    print("\n### Memory of one forward+backward (MiB)\n")
    print(
        "Peak-RSS growth in a fresh process (first figure) and bytes saved for backward by the layer beyond its "
        "input and weights (second figure).\n"
    )
    print("| layer | " + " | ".join(VARIANTS) + " | additive / lora (RSS) |")
    print("|" + "---|" * (len(VARIANTS) + 2))
    saved_total = {v: 0 for v in VARIANTS}
    for index, (spec, saved) in enumerate(zip(LAYERS, saved_rows, strict=True)):
        peak = {v: rss[v][index] for v in VARIANTS}
        for v in VARIANTS:
            saved_total[v] += spec.count * saved[v]
        cells = " | ".join(f"{peak[v] / mib:.1f} / {saved[v] / mib:.2f}" for v in VARIANTS)
        print(f"| {spec.name} | {cells} | {peak['additive'] / peak['peft-lora']:.2f} |", flush=True)
    print(
        "\nSaved for backward over all layers (count-weighted, MiB): "
        + ", ".join(f"{v} {saved_total[v] / mib:.1f}" for v in VARIANTS)
    )


def _cells(ms: dict[str, float], wall_ms: dict[str, float]) -> str:
    lora = ms["peft-lora"]
    return (
        " | ".join(f"{ms[v]:.2f}" for v in VARIANTS)
        + f" | {ms['additive'] / lora:.2f} | {ms['rotational'] / lora:.2f} | {ms['rebuild-W'] / lora:.1f}"
        + f" | {wall_ms['additive'] / wall_ms['peft-lora']:.2f} |"
    )


def sd15_targets() -> dict[str, nn.Module]:
    """SD 1.5's UNet and CLIP text encoder (real config, built on the meta device) with random target weights."""
    from spectral_diffusion.testing.sd15 import sd15_pipeline

    pipe = sd15_pipeline(device="meta")
    unet, text_encoder = pipe.unet, pipe.text_encoder
    targets = find_targets(unet, text_encoder, "attn+ff")
    gen = torch.Generator().manual_seed(0)
    for module in targets.values():
        shape = module.weight.shape
        module.weight = nn.Parameter(torch.randn(shape, generator=gen) / shape[1] ** 0.5, requires_grad=False)
    return targets


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_svd(k: int) -> None:
    targets = sd15_targets()
    print(f"\n## SVD of the SD 1.5 attn+ff targets ({len(targets)} layers, k = {k})\n")
    print("| step | wall s | CPU s |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        cold, warm = SVDCache(tmp), SVDCache(tmp)
        cold_wall, cold_cpu = _timed(partial(cold.band_svd, targets, k))
        warm_wall, warm_cpu = _timed(partial(warm.band_svd, targets, k))
    print(f"| cold: digest + exact SVD + write ({cold.misses} misses) | {cold_wall:.1f} | {cold_cpu:.1f} |")
    print(f"| cached: digest + read ({warm.hits} hits) | {warm_wall:.1f} | {warm_cpu:.1f} |")

    print(
        "\nExact thin SVD of a wide W directly vs of W^T (what `oriented_svd` does), one layer per distinct"
    )
    print("wide shape, median CPU seconds of 3:\n")
    print("| shape (out x in) | layers | SVD of W | SVD of W^T | speed-up |\n|---|---|---|---|---|")
    shapes: dict[tuple[int, int], list[torch.Tensor]] = {}
    for module in targets.values():
        w = weight_matrix(module).detach()
        if w.shape[0] < w.shape[1]:
            shapes.setdefault(tuple(w.shape), []).append(w)
    totals = [0.0, 0.0]
    for shape, weights in sorted(shapes.items()):
        w = weights[0]
        direct = statistics.median(
            _timed(partial(torch.linalg.svd, w, full_matrices=False))[1] for _ in range(3)
        )
        swapped = statistics.median(
            _timed(partial(torch.linalg.svd, w.mT, full_matrices=False))[1] for _ in range(3)
        )
        totals[0] += len(weights) * direct
        totals[1] += len(weights) * swapped
        print(
            f"| {shape[0]} x {shape[1]} | {len(weights)} | {direct:.2f} | {swapped:.2f} | x{direct / swapped:.1f} |"
        )
    print(
        f"| all wide layers (count-weighted) | {sum(map(len, shapes.values()))} | {totals[0]:.1f} | {totals[1]:.1f} "
        f"| x{totals[0] / totals[1]:.1f} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is steadier on a shared CPU)"
    )
    parser.add_argument("--svd-k", type=int, default=64)
    parser.add_argument("--skip-layers", action="store_true")
    parser.add_argument("--skip-svd", action="store_true")
    parser.add_argument("--probe", metavar="VARIANT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe:
        probe_rss(args.probe, args.rank)
        return
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads} thread(s), load {os.getloadavg()[0]:.1f}"
    )
    if not args.skip_layers:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["SPECTRAL_DIFFUSION_CACHE"] = tmp  # rebuild-W's full SVDs, shared with the probes
            bench_layers(args.rank, args.rounds, args.threads)
    if not args.skip_svd:
        bench_svd(args.svd_k)


if __name__ == "__main__":
    main()
