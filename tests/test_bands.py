"""Band math: weight views and digests, the sign-fixed SVD, band bounds, Cayley rotations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spectral_diffusion.bands import (
    band_angles,
    band_columns,
    cayley,
    check_band_fits,
    conv_kernel,
    oriented_svd,
    randomized_svd,
    shared_columns,
    skew_from_params,
    svd_residual,
    tensor_digest,
    weight_matrix,
)
from spectral_diffusion.errors import SpectralDiffusionError


def test_weight_matrix_views_linear_and_conv() -> None:
    linear = nn.Linear(5, 3)
    assert weight_matrix(linear) is linear.weight
    assert conv_kernel(linear) is None
    for kernel in (1, 3):
        conv = nn.Conv2d(6, 4, kernel_size=kernel, stride=2, padding=kernel // 2)
        matrix = weight_matrix(conv)
        assert matrix.shape == (4, 6 * kernel * kernel)
        assert conv_kernel(conv) == (kernel, kernel)
        assert matrix.data_ptr() == conv.weight.data_ptr()  # a view: merging edits the conv in place
        assert torch.equal(matrix[1, :kernel * kernel], conv.weight[1, 0].flatten())  # in-channel major, as unfold


@pytest.mark.parametrize(
    "module",
    [
        nn.Conv2d(4, 4, 1, groups=2),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"),
        nn.LayerNorm(4),
    ],
)
def test_weight_matrix_refuses_other_layers(module: nn.Module) -> None:
    with pytest.raises(SpectralDiffusionError, match=type(module).__name__):
        weight_matrix(module)


def test_band_columns() -> None:
    assert band_columns(0, 8) == slice(0, 8)
    assert band_columns(3, 4) == slice(12, 16)


def test_bands_of_different_ranks_overlap_by_columns() -> None:
    assert shared_columns(1, 4, 0, 8) == slice(4, 8)  # band 1 at rank 4 lies inside band 0 at rank 8
    assert shared_columns(0, 8, 1, 4) == slice(4, 8)
    assert shared_columns(1, 8, 3, 4) == slice(12, 16)
    assert shared_columns(2, 4, 0, 8) is None and shared_columns(0, 4, 1, 4) is None  # touching is not sharing


def test_check_band_fits_names_layer_end_and_limit() -> None:
    check_band_fits("unet.x.to_q", (40, 32), band=3, rank=8)  # columns up to 32 == min(40, 32): fits
    with pytest.raises(
        SpectralDiffusionError, match=r"column 40, but layer unet\.x\.to_q .*min\(out, in\) = 32"
    ):
        check_band_fits("unet.x.to_q", (40, 32), band=4, rank=8)


@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (24, 24)])
def test_oriented_svd_is_exact_orthonormal_and_sign_fixed(shape: tuple[int, int]) -> None:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    m = min(shape)
    u, s, v = oriented_svd(w, m)
    assert u.shape == (shape[0], m) and s.shape == (m,) and v.shape == (shape[1], m)
    assert u.dtype == s.dtype == v.dtype == torch.float32
    torch.testing.assert_close(u @ torch.diag(s) @ v.T, w, atol=1e-5, rtol=0)
    torch.testing.assert_close(u.T @ u, torch.eye(m), atol=1e-5, rtol=0)
    torch.testing.assert_close(v.T @ v, torch.eye(m), atol=1e-5, rtol=0)
    assert bool((s[:-1] >= s[1:]).all())
    pivots = u.abs().argmax(dim=0)
    assert bool((u[pivots, torch.arange(m)] > 0).all())


def test_oriented_svd_top_k_and_deterministic() -> None:
    w = torch.randn(30, 50, generator=torch.Generator().manual_seed(1))
    u, s, v = oriented_svd(w, 6)
    u_all, s_all, v_all = oriented_svd(w.clone(), 30)
    assert torch.equal(u, oriented_svd(w.clone(), 6)[0])
    torch.testing.assert_close(u, u_all[:, :6])
    torch.testing.assert_close(s, s_all[:6])
    torch.testing.assert_close(v, v_all[:, :6])


def test_oriented_svd_sign_flip_invariance() -> None:
    """The convention picks the same vectors whatever signs LAPACK returns: -W gives U flipped or V flipped."""
    w = torch.randn(16, 12, generator=torch.Generator().manual_seed(2))
    u, _, v = oriented_svd(w, 12)
    u_neg, _, v_neg = oriented_svd(-w, 12)
    torch.testing.assert_close(u_neg, u, atol=1e-5, rtol=0)
    torch.testing.assert_close(v_neg, -v, atol=1e-5, rtol=0)


def test_oriented_svd_refuses_too_many_columns() -> None:
    with pytest.raises(SpectralDiffusionError, match="cannot take 9 singular vectors of a 8x20"):
        oriented_svd(torch.randn(8, 20), 9)


def decaying(out_features: int, in_features: int, seed: int = 3) -> torch.Tensor:
    """A weight whose singular values fall like i^-1/2 (trained weights decay; Gaussian ones are flat)."""
    gen = torch.Generator().manual_seed(seed)
    m = min(out_features, in_features)
    spectrum = (torch.arange(m) + 1.0) ** -0.5
    return (torch.randn(out_features, m, generator=gen) * spectrum) @ torch.randn(m, in_features, generator=gen)


@pytest.mark.parametrize("shape", [(520, 600), (600, 520)])
def test_randomized_svd_matches_the_exact_bands(shape: tuple[int, int]) -> None:
    w = decaying(*shape)
    exact = oriented_svd(w, 32)
    u, s, v = randomized_svd(w, 32, oversample=32, power_iters=8)
    assert u.shape == (shape[0], 32) and s.shape == (32,) and v.shape == (shape[1], 32)
    assert float(band_angles(exact[0], u, 8).max()) < 0.01 and float(band_angles(exact[2], v, 8).max()) < 0.01
    torch.testing.assert_close(s, exact[1], rtol=1e-4, atol=0)
    torch.testing.assert_close(u.T @ u, torch.eye(32), atol=1e-5, rtol=0)
    assert float(svd_residual(w, u, s, v).max()) < 1e-2
    assert float(svd_residual(w, *exact).max()) < 1e-4
    pivots = u.abs().argmax(dim=0)
    assert bool((u[pivots, torch.arange(32)] > 0).all())


def test_randomized_svd_is_deterministic_and_sign_fixed() -> None:
    w = decaying(300, 280)
    u, s, v = randomized_svd(w, 8, oversample=8, power_iters=2)
    again = randomized_svd(w.clone(), 8, oversample=8, power_iters=2)
    assert all(torch.equal(x, y) for x, y in zip((u, s, v), again, strict=True))
    u_neg, _, v_neg = randomized_svd(-w, 8, oversample=8, power_iters=2)
    torch.testing.assert_close(u_neg, u, atol=1e-5, rtol=0)
    torch.testing.assert_close(v_neg, -v, atol=1e-5, rtol=0)


def test_residual_flags_an_unconverged_flat_spectrum() -> None:
    """Gaussian weights have near-equal singular values: few power iterations leave a large residual."""
    w = torch.randn(600, 520, generator=torch.Generator().manual_seed(0))
    assert float(svd_residual(w, *randomized_svd(w, 32, oversample=32, power_iters=2)).max()) > 0.1


def test_band_angles_are_zero_for_a_rotation_inside_a_band() -> None:
    q = torch.linalg.qr(torch.randn(40, 8, generator=torch.Generator().manual_seed(0))).Q
    rotation = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1))).Q
    turned = torch.cat([q[:, :4] @ rotation, q[:, 4:]], dim=1)
    assert float(band_angles(q, turned, 4).max()) < 1e-6
    swapped = torch.cat([q[:, 4:], q[:, :4]], dim=1)
    torch.testing.assert_close(band_angles(q, swapped, 4), torch.full((2,), torch.pi / 2, dtype=torch.float64))


def test_skew_from_params() -> None:
    params = torch.arange(1.0, 7.0)
    k = skew_from_params(params, 4)
    assert torch.equal(k, -k.T)
    assert k[0, 1] == 1 and k[0, 3] == 3 and k[2, 3] == 6 and k[3, 2] == -6
    with pytest.raises(SpectralDiffusionError, match="rank-4 rotation needs 6 parameters"):
        skew_from_params(torch.zeros(5), 4)


def test_cayley_orthogonal_and_identity_at_zero() -> None:
    r = 6
    assert torch.equal(cayley(skew_from_params(torch.zeros(r * (r - 1) // 2), r)), torch.eye(r))
    params = torch.randn(r * (r - 1) // 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    q = cayley(skew_from_params(params, r))
    torch.testing.assert_close(q.T @ q, torch.eye(r, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.linalg.det(q) > 0  # a rotation: the Cayley map never reaches reflections


def test_tensor_digest_is_dtype_blind_and_shape_aware() -> None:
    t = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    assert tensor_digest(t) == tensor_digest(t.half()) == tensor_digest(t.T.contiguous().T)
    assert tensor_digest(t) != tensor_digest(t.reshape(4, 6))
    assert tensor_digest(t) != tensor_digest(t + 1e-2)
    assert len(tensor_digest(t)) == 64
