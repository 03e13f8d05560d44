"""The on-disk SVD cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from spectral_diffusion.bands import band_angles, oriented_svd, weight_matrix
from spectral_diffusion.svd_cache import MIN_STORED_COLUMNS, SVDCache, default_cache_dir


def layers(seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    return {"a": nn.Linear(40, 24), "b": nn.Conv2d(16, 48, kernel_size=1), "c": nn.Linear(96, 80)}


def entry_files(cache: SVDCache) -> list[Path]:
    return sorted(cache.cache_dir.iterdir())


def test_second_request_is_served_from_disk_identically(tmp_path: Path) -> None:
    mods = layers()
    first = SVDCache(tmp_path).band_svd(mods, 8)
    assert [f.suffix for f in entry_files(SVDCache(tmp_path))] == [".safetensors"] * 3  # no temp files left
    again = SVDCache(tmp_path)
    second = again.band_svd(mods, 8)
    assert (again.hits, again.misses) == (3, 0)
    for name in mods:
        assert all(torch.equal(x, y) for x, y in zip(first[name], second[name], strict=True))
        u, s, v = oriented_svd(mods[name].weight.reshape(mods[name].weight.shape[0], -1), 8)
        assert (
            torch.equal(second[name][0], u)
            and torch.equal(second[name][1], s)
            and torch.equal(second[name][2], v)
        )


def test_entry_serves_smaller_k_and_recomputes_larger(tmp_path: Path) -> None:
    mods = {"c": layers()["c"]}  # 80 x 96: stores max(k, MIN_STORED_COLUMNS) = 64 columns
    cache = SVDCache(tmp_path)
    big = cache.band_svd(mods, 4)["c"]
    small = cache.band_svd(mods, 2)["c"]
    assert (cache.hits, cache.misses) == (1, 1)
    assert big[0].shape == (80, 4) and small[0].shape == (80, 2)
    assert torch.equal(small[0], big[0][:, :2]) and torch.equal(small[2], big[2][:, :2])
    assert cache.band_svd(mods, MIN_STORED_COLUMNS)["c"][1].shape == (MIN_STORED_COLUMNS,)
    assert cache.misses == 1
    wider = cache.band_svd(mods, 72)["c"]
    assert cache.misses == 2 and wider[0].shape == (80, 72)
    assert cache.band_svd(mods, 72)["c"][1].shape == (72,) and cache.hits == 3


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_shape", "nan"])
def test_damaged_entry_is_recomputed_and_rewritten(tmp_path: Path, damage: str) -> None:
    mods = {"a": layers()["a"]}
    expected = SVDCache(tmp_path).band_svd(mods, 6)["a"]
    (path,) = entry_files(SVDCache(tmp_path))
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "garbage":
        path.write_bytes(b"not a safetensors file")
    else:
        from safetensors.torch import save_file

        bad = {"U": torch.zeros(24, 10), "S": torch.zeros(10), "V": torch.zeros(40, 10)}
        if damage == "wrong_shape":
            bad["U"] = torch.zeros(23, 10)
        else:
            bad["S"][0] = float("nan")
        save_file(bad, path)
    cache = SVDCache(tmp_path)
    recomputed = cache.band_svd(mods, 6)["a"]
    assert (cache.hits, cache.misses) == (0, 1)
    assert all(torch.equal(x, y) for x, y in zip(recomputed, expected, strict=True))
    fresh = SVDCache(tmp_path)
    fresh.band_svd(mods, 6)
    assert fresh.hits == 1  # the rewritten entry is good again


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECTRAL_DIFFUSION_CACHE", str(tmp_path / "root"))
    assert default_cache_dir() == tmp_path / "root" / "svd"
    assert SVDCache().cache_dir == tmp_path / "root" / "svd"
    assert SVDCache(tmp_path / "explicit").cache_dir == tmp_path / "explicit"
    monkeypatch.delenv("SPECTRAL_DIFFUSION_CACHE")
    assert default_cache_dir().parts[-2:] == ("spectral-diffusion", "svd")


def test_entries_are_keyed_by_weight_content(tmp_path: Path) -> None:
    cache = SVDCache(tmp_path)
    linear = nn.Linear(20, 12)
    cache.band_svd({"x": linear}, 4)
    cache.band_svd({"renamed": linear}, 4)
    assert (cache.hits, cache.misses) == (1, 1)
    with torch.no_grad():
        linear.weight[0, 0] += 1.0
    cache.band_svd({"x": linear}, 4)
    assert cache.misses == 2 and len(entry_files(cache)) == 2


def wide_layer(flat: bool) -> nn.Linear:
    """A 520 x 600 layer (wide enough for the randomized SVD at 64 columns), decaying or flat (Gaussian) spectrum."""
    gen = torch.Generator().manual_seed(5)
    layer = nn.Linear(600, 520, bias=False)
    with torch.no_grad():
        if flat:
            layer.weight.copy_(torch.randn(520, 600, generator=gen))
        else:
            spectrum = (torch.arange(520) + 1.0) ** -0.5
            layer.weight.copy_((torch.randn(520, 520, generator=gen) * spectrum) @ torch.randn(520, 600, generator=gen))
    return layer


def test_randomized_entries_match_exact_and_are_cached_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("spectral_diffusion.svd_cache.RANDOMIZED_MIN_RATIO", 4 * 64 / 520)  # 520 counts as wide
    mods = {"w": wide_layer(flat=False)}
    fast = SVDCache(tmp_path)
    assert fast.method == "randomized"
    u, s, v = fast.band_svd(mods, 16)["w"]
    assert (fast.misses, fast.fallbacks) == (1, 0)
    exact = SVDCache(tmp_path, method="exact")
    ue, se, ve = exact.band_svd(mods, 16)["w"]
    assert exact.misses == 1 and len(entry_files(exact)) == 2  # one entry per method, never served across
    assert float(band_angles(ue, u, 4).max()) < 0.01 and float(band_angles(ve, v, 4).max()) < 0.01
    torch.testing.assert_close(s, se, rtol=1e-4, atol=0)
    again = SVDCache(tmp_path)
    served = again.band_svd(mods, 8)["w"]  # any k up to 64 reads the same 64-column entry
    assert (again.hits, again.misses) == (1, 0) and torch.equal(served[0], u[:, :8])


def test_flat_spectrum_falls_back_to_the_exact_svd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("spectral_diffusion.svd_cache.RANDOMIZED_MIN_RATIO", 4 * 64 / 520)
    layer = wide_layer(flat=True)
    cache = SVDCache(tmp_path)
    u, s, v = cache.band_svd({"w": layer}, 16)["w"]
    assert (cache.misses, cache.fallbacks) == (1, 1)
    expected = oriented_svd(weight_matrix(layer), 64)
    assert torch.equal(u, expected[0][:, :16]) and torch.equal(s, expected[1][:16])


def test_narrow_layers_use_the_exact_svd_under_its_own_key(tmp_path: Path) -> None:
    mods = layers()
    SVDCache(tmp_path).band_svd(mods, 8)
    exact = SVDCache(tmp_path, method="exact")
    exact.band_svd(mods, 8)
    assert exact.hits == 3
    with pytest.raises(ValueError, match="unknown SVD method"):
        SVDCache(tmp_path, method="lanczos")
