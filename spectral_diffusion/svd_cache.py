"""The band SVD of every adapted layer, computed once per base model and cached on disk.

Entries are keyed by the weight's ``tensor_digest``, so any checkpoint that shares a layer shares its
entry. An entry holds the top ``K`` singular triplets and serves any ``k <= K`` by slicing; an entry that
cannot be read or has the wrong shape is recomputed and rewritten, never trusted.

Two methods: ``exact`` (LAPACK thin SVD) and ``randomized`` (the default: ``bands.randomized_svd`` on layers wide
enough for it to pay, checked by its residual, exact elsewhere). They are cached under different names, so a
concept's bands never depend on which method ran earlier on the machine; a randomized entry is computed for a
fixed column count (``k`` rounded up to ``MIN_STORED_COLUMNS``), so it is the same whatever ``k`` asked first.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from spectral_diffusion.atomic import atomic_write
from spectral_diffusion.bands import oriented_svd, randomized_svd, svd_residual, tensor_digest, weight_matrix
from spectral_diffusion.progress import StepProgress

SVD = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# Entries keep at least this many columns (when the layer has them), so that later concepts in higher
# bands of the same base model hit the cache instead of recomputing the SVD.
MIN_STORED_COLUMNS = 64
METHODS = ("exact", "randomized")
# Randomized SVD settings (measured in docs/benchmarks.md): a sketch of twice the stored columns, 8 power
# iterations; used on layers whose smaller side is at least 4x the sketch (below that the exact SVD is about as
# cheap), and kept only if every column's relative residual |W v - s u| / s is under RESIDUAL_TOLERANCE, else the
# layer falls back to the exact SVD (a flat spectrum, e.g. random weights, needs far more iterations).
POWER_ITERATIONS = 8
RANDOMIZED_MIN_RATIO = 4
RESIDUAL_TOLERANCE = 1e-2
RANDOMIZED_SEED = 0


def default_cache_dir() -> Path:
    """``$SPECTRAL_DIFFUSION_CACHE/svd``, else the platform user cache dir + ``/svd``."""
    root = os.environ.get("SPECTRAL_DIFFUSION_CACHE") or platformdirs.user_cache_dir("spectral-diffusion")
    return Path(root) / "svd"


class SVDCache:
    """Top-k oriented SVDs of layer weights, on disk; ``hits``/``misses`` count layers served / computed, and
    ``fallbacks`` the randomized misses whose residual check sent them to the exact SVD."""

    def __init__(self, cache_dir: str | Path | None = None, method: str = "randomized") -> None:
        if method not in METHODS:
            raise ValueError(f"unknown SVD method {method!r}; choose one of {', '.join(METHODS)}")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.method = method
        self.hits = 0
        self.misses = 0
        self.fallbacks = 0

    def path_for(self, digest: str, columns: int | None = None) -> Path:
        """The exact entry of a weight, or (``columns`` given) its randomized entry of that many columns."""
        if columns is None:
            return self.cache_dir / f"{digest}.safetensors"
        tag = f"rsvd-k{columns}-p{columns}-q{POWER_ITERATIONS}-s{RANDOMIZED_SEED}"
        return self.cache_dir / f"{digest}.{tag}.safetensors"

    def randomized_columns(self, shape: tuple[int, int], k: int) -> int | None:
        """Columns a randomized entry of this shape holds for a request of ``k``; None where the exact SVD is used."""
        if self.method != "randomized":
            return None
        columns = -(-k // MIN_STORED_COLUMNS) * MIN_STORED_COLUMNS
        return columns if min(shape) >= RANDOMIZED_MIN_RATIO * 2 * columns else None

    def band_svd(self, layers: dict[str, nn.Module], k: int) -> dict[str, SVD]:
        """``(U [out,k], S [k], V [in,k])`` in fp32 on the CPU for each layer (Linear or Conv2d)."""
        result: dict[str, SVD] = {}
        to_compute: list[tuple[str, torch.Tensor, Path, int | None]] = []
        for name, module in layers.items():
            weight = weight_matrix(module)
            columns = self.randomized_columns(tuple(weight.shape), k)
            path = self.path_for(tensor_digest(weight), columns)
            cached = self._read(path, tuple(weight.shape), k)
            if cached is None:
                to_compute.append((name, weight, path, columns))
            else:
                result[name] = cached
                self.hits += 1
        progress = StepProgress(len(to_compute), desc="SVD of adapted layers", enabled=bool(to_compute))
        for name, weight, path, columns in to_compute:
            u, s, v = self._compute(weight, k, columns)
            self._write(path, u.cpu(), s.cpu(), v.cpu())
            result[name] = (
                u[:, :k].cpu().contiguous(),
                s[:k].cpu().contiguous(),
                v[:, :k].cpu().contiguous(),
            )
            self.misses += 1
            progress.update()
        progress.close()
        return {name: result[name] for name in layers}

    def _compute(self, weight: torch.Tensor, k: int, columns: int | None) -> SVD:
        """The SVD to store: randomized with ``columns`` columns when given and its residual passes, else exact."""
        if columns is not None:
            u, s, v = randomized_svd(
                weight, columns, oversample=columns, power_iters=POWER_ITERATIONS, seed=RANDOMIZED_SEED
            )
            if float(svd_residual(weight, u, s, v).max()) <= RESIDUAL_TOLERANCE:
                return u, s, v
            self.fallbacks += 1
            return oriented_svd(weight, columns)
        return oriented_svd(weight, min(min(weight.shape), max(k, MIN_STORED_COLUMNS)))

    def _read(self, path: Path, shape: tuple[int, int], k: int) -> SVD | None:
        """The cached top-k of a weight, or None when absent, unreadable, malformed or too short."""
        if not path.is_file():
            return None
        try:
            tensors = load_file(path)
            u, s, v = tensors["U"], tensors["S"], tensors["V"]
        except (SafetensorError, OSError, KeyError, ValueError, RuntimeError):
            return None
        columns = s.shape[0] if s.dim() == 1 else -1
        well_formed = (
            k <= columns
            and u.shape == (shape[0], columns)
            and v.shape == (shape[1], columns)
            and all(t.dtype == torch.float32 and bool(torch.isfinite(t).all()) for t in (u, s, v))
        )
        if not well_formed:
            return None
        return u[:, :k].contiguous(), s[:k].contiguous(), v[:, :k].contiguous()

    @staticmethod
    def _write(path: Path, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> None:
        """Atomically: a reader (another process, a later run after a crash) sees a whole entry or none."""
        tensors = {"U": u.contiguous(), "S": s.contiguous(), "V": v.contiguous()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp))
