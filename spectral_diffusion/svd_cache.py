"""The band SVD of every adapted layer, computed once per base model and cached on disk.

Entries are keyed by the weight's ``tensor_digest``, so any checkpoint that shares a layer shares its
entry. An entry holds the top ``K`` singular triplets and serves any ``k <= K`` by slicing; an entry that
cannot be read or has the wrong shape is recomputed and rewritten, never trusted.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import platformdirs
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from spectral_diffusion.bands import oriented_svd, weight_matrix
from spectral_diffusion.fingerprint import tensor_digest

SVD = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# Entries keep at least this many columns (when the layer has them), so that later concepts in higher
# bands of the same base model hit the cache instead of recomputing the SVD.
MIN_STORED_COLUMNS = 64


def default_cache_dir() -> Path:
    """``$SPECTRAL_DIFFUSION_CACHE/svd``, else the platform user cache dir + ``/svd``."""
    root = os.environ.get("SPECTRAL_DIFFUSION_CACHE") or platformdirs.user_cache_dir("spectral-diffusion")
    return Path(root) / "svd"


class SVDCache:
    """Top-k oriented SVDs of layer weights, on disk; ``hits``/``misses`` count layers served / computed."""

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0

    def path_for(self, digest: str) -> Path:
        return self.cache_dir / f"{digest}.safetensors"

    def band_svd(self, layers: dict[str, nn.Module], k: int) -> dict[str, SVD]:
        """``(U [out,k], S [k], V [in,k])`` in fp32 on the CPU for each layer (Linear or 1x1 Conv2d)."""
        result: dict[str, SVD] = {}
        to_compute: list[tuple[str, torch.Tensor, str]] = []
        for name, module in layers.items():
            weight = weight_matrix(module)
            digest = tensor_digest(weight)
            cached = self._read(digest, tuple(weight.shape), k)
            if cached is None:
                to_compute.append((name, weight, digest))
            else:
                result[name] = cached
                self.hits += 1
        for name, weight, digest in tqdm(
            to_compute, desc="SVD of adapted layers", unit="layer", disable=not to_compute
        ):
            stored = min(min(weight.shape), max(k, MIN_STORED_COLUMNS))
            u, s, v = oriented_svd(weight, stored)
            self._write(digest, u.cpu(), s.cpu(), v.cpu())
            result[name] = (
                u[:, :k].cpu().contiguous(),
                s[:k].cpu().contiguous(),
                v[:, :k].cpu().contiguous(),
            )
            self.misses += 1
        return {name: result[name] for name in layers}

    def _read(self, digest: str, shape: tuple[int, int], k: int) -> SVD | None:
        """The cached top-k of a weight, or None when absent, unreadable, malformed or too short."""
        path = self.path_for(digest)
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

    def _write(self, digest: str, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{digest[:16]}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({"U": u.contiguous(), "S": s.contiguous(), "V": v.contiguous()}, tmp)
            os.replace(tmp, self.path_for(digest))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
