"""Band math of the Spectral Adapter: weight views and digests, sign-fixed thin SVD, band slicing, Cayley rotations.

Band ``i`` of rank ``r`` is the singular-vector columns ``[i*r, (i+1)*r)`` of the thin SVD ``W = U diag(s) V^T``
(the method is summarised in docs/architecture.md).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from spectral_diffusion.errors import SpectralDiffusionError


def is_linear_map(module: nn.Module) -> bool:
    """True for an nn.Linear or an ungrouped, zero-padded nn.Conv2d of any kernel size.

    A convolution is a linear map from each unfolded ``in x kh x kw`` input patch to ``out`` channels, so the band
    math applies to its weight reshaped to ``[out, in*kh*kw]`` (LoCon's view of a conv layer).
    """
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"


def conv_kernel(module: nn.Module) -> tuple[int, int] | None:
    """``(kh, kw)`` of a Conv2d (1x1 included), None for a Linear: how a ``[out, in*kh*kw]`` factor is laid out."""
    return tuple(module.kernel_size) if isinstance(module, nn.Conv2d) else None


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The ``[out, in*kh*kw]`` matrix of a Linear or Conv2d (a view sharing storage with the weight)."""
    if not is_linear_map(module):
        raise SpectralDiffusionError(
            f"cannot adapt a {type(module).__name__}: only nn.Linear and ungrouped, zero-padded nn.Conv2d "
            "layers are supported"
        )
    weight = module.weight
    return weight if weight.dim() == 2 else weight.view(weight.shape[0], -1)


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 (hex) of a tensor's shape and fp16-cast bytes: the SVD cache key of a weight.

    Casting to fp16 first makes the same model loaded in fp32 or fp16 hash alike.
    """
    data = tensor.detach().to(device="cpu", dtype=torch.float16).contiguous()
    digest = hashlib.sha256(repr(tuple(data.shape)).encode())
    digest.update(data.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def band_columns(band: int, rank: int) -> slice:
    """The singular-vector columns owned by ``band`` at ``rank``."""
    return slice(band * rank, (band + 1) * rank)


def shared_columns(band: int, rank: int, other_band: int, other_rank: int) -> slice | None:
    """The columns that two bands both own, or None: bands of different ranks conflict by columns, not by number
    (band 1 at rank 4 is inside band 0 at rank 8), so this is the one test of whether two concepts overlap."""
    a, b = band_columns(band, rank), band_columns(other_band, other_rank)
    start, stop = max(a.start, b.start), min(a.stop, b.stop)
    return slice(start, stop) if start < stop else None


def check_band_fits(layer_name: str, shape: tuple[int, ...] | torch.Size, band: int, rank: int) -> None:
    """Refuse a band that reaches past the layer's ``min(out, in)`` singular vectors."""
    end = band_columns(band, rank).stop
    limit = min(shape[0], shape[1])
    if end > limit:
        fitting = limit // rank
        # No "use a lower band": with --band auto the lower bands may all be taken by other concepts.
        fits = f"only bands 0 to {fitting - 1} fit it at rank {rank}" if fitting else f"rank {rank} is too large"
        raise SpectralDiffusionError(
            f"band {band} at rank {rank} needs singular vectors up to column {end}, but layer {layer_name} "
            f"({shape[0]}x{shape[1]}) has only min(out, in) = {limit}: {fits}"
        )


def oriented_svd(weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` exact thin SVD ``W ~ U diag(S) V^T`` in fp32, returned as ``(U[out,k], S[k], V[in,k])``.

    Signs are fixed so the same weight gives the same vectors on every call and machine as far as LAPACK
    allows: in each column of ``U`` the entry of largest magnitude (first one on ties) is positive, and the
    matching ``V`` column is flipped with it. LAPACK is faster on tall matrices, so a wide ``W`` is
    decomposed as ``W^T = V S U^T`` and the factors swapped (measured in docs/benchmarks.md).
    """
    out_features, in_features = weight.shape
    if not 0 < k <= min(out_features, in_features):
        raise SpectralDiffusionError(
            f"cannot take {k} singular vectors of a {out_features}x{in_features} matrix"
        )
    w = weight.detach().to(torch.float32)
    if out_features >= in_features:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        v = vh.mT
    else:
        v, s, uh = torch.linalg.svd(w.mT, full_matrices=False)
        u = uh.mT
    return _oriented(u[:, :k], s[:k], v[:, :k])


def _oriented(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sign convention shared by the exact and randomized SVDs: each ``U`` column's largest entry positive."""
    pivot = u.abs().argmax(dim=0, keepdim=True)
    signs = torch.where(u.gather(0, pivot) < 0, -1.0, 1.0)
    return (u * signs).contiguous(), s.contiguous(), (v * signs).contiguous()


def randomized_svd(
    weight: torch.Tensor, k: int, *, oversample: int, power_iters: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` SVD by a randomized range finder (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1), in fp32.

    Only the top ``k`` columns are needed for the bands, and sketching ``W`` with ``k + oversample`` Gaussian
    vectors, refined by ``power_iters`` orthonormalised power iterations, costs a few products with ``W`` instead
    of a full decomposition. The Gaussian comes from a CPU generator seeded by ``seed`` alone, so the same weight
    gives the same bands on every call, and signs follow ``oriented_svd``'s convention. The result satisfies
    ``W^T U = V diag(S)`` exactly (Rayleigh-Ritz); how far ``W V`` is from ``U diag(S)`` is what
    ``svd_residual`` measures.
    """
    out_features, in_features = weight.shape
    if not 0 < k <= min(out_features, in_features):
        raise SpectralDiffusionError(
            f"cannot take {k} singular vectors of a {out_features}x{in_features} matrix"
        )
    w = weight.detach().to(torch.float32)
    sketch = min(k + oversample, min(out_features, in_features))
    gaussian = torch.randn(in_features, sketch, generator=torch.Generator().manual_seed(seed))
    q = torch.linalg.qr(w @ gaussian.to(w.device)).Q
    for _ in range(power_iters):
        q = torch.linalg.qr(w @ torch.linalg.qr(w.mT @ q).Q).Q
    ub, s, vh = torch.linalg.svd(q.mT @ w, full_matrices=False)
    return _oriented((q @ ub[:, :k]), s[:k], vh[:k].mT)


def svd_residual(
    weight: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """Per column ``|W v_i - s_i u_i| / s_i``: zero for exact singular triplets.

    With ``W^T U = V diag(S)`` exact (as ``randomized_svd`` gives), the angle between a computed band's subspace
    and the exact one is at most this residual times ``s / gap`` at the band's edges (Wedin's theorem).
    """
    residual = weight.detach().to(torch.float32) @ v - u * s
    return residual.norm(dim=0) / s.clamp_min(torch.finfo(torch.float32).tiny)


def band_angles(reference: torch.Tensor, other: torch.Tensor, rank: int) -> torch.Tensor:
    """Largest principal angle (radians, fp64) between the spans of each band's columns in two bases.

    How far one SVD's band ``i`` (columns ``[i*rank, (i+1)*rank)``) is from another's, blind to the rotations
    inside a band that near-equal singular values allow.
    """
    angles = []
    for band in range(reference.shape[1] // rank):
        cols = band_columns(band, rank)
        a, b = reference[:, cols].double(), other[:, cols].double()
        # sin of the largest angle is the norm of b outside span(a); arcsin keeps small angles precise, arccos not
        sine = torch.linalg.matrix_norm(b - a @ (a.mT @ b), ord=2)
        angles.append(torch.arcsin(sine.clamp(max=1.0)))
    return torch.stack(angles)


def skew_from_params(params: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank x rank`` skew-symmetric matrices whose strict upper triangles hold ``params [..., pairs]``.

    Values fill the upper triangle row-major; leading dimensions batch several matrices.
    """
    expected = rank * (rank - 1) // 2
    if params.shape[-1:] != (expected,):
        raise SpectralDiffusionError(
            f"a rank-{rank} rotation needs {expected} parameters, got shape {tuple(params.shape)}"
        )
    rows, cols = torch.triu_indices(rank, rank, offset=1, device=params.device)
    upper = params.new_zeros(*params.shape[:-1], rank, rank)
    upper[..., rows, cols] = params
    return upper - upper.mT


def cayley(skew: torch.Tensor) -> torch.Tensor:
    """Orthogonal ``Q = (I - K)(I + K)^-1`` of skew-symmetric ``K [..., r, r]``; ``Q = I`` exactly at ``K = 0``.

    ``I + K`` is always invertible for skew ``K`` (eigenvalues ``1 + i*t``) and the two factors commute, so
    ``Q`` is one linear solve, without the error check (a device sync on GPUs) that can never fire.
    """
    eye = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device)
    return torch.linalg.solve_ex(eye + skew, eye - skew).result
