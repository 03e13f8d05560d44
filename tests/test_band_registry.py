"""`--band auto`: registry per base fingerprint plus a concepts folder; stale entries, ranks, odd files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from spectral_diffusion.band_registry import BandUse, choose_band, register_band, registry_path, used_bands
from spectral_diffusion.concept_file import Concept, ConceptMeta, save_concept
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.fingerprint import base_fingerprint
from spectral_diffusion.training.config import TrainConfig
from spectral_diffusion.training.trainer import Trainer

FP = "0123456789abcdef"


def _concept_file(path: Path, band: int | None, rank: int, variant: str = "additive", fingerprint: str = FP) -> Path:
    """A minimal valid concept file: one 8x6 layer."""
    if variant == "additive":
        z = torch.zeros
        state = {"U": z(8, rank), "S": torch.ones(rank), "V": z(6, rank), "A": z(8, rank), "B": z(6, rank)}
    else:
        state = {"down": torch.zeros(rank, 6), "up": torch.zeros(8, rank)}
    meta = ConceptMeta(variant=variant, rank=rank, band=band, targets="attn", base_fingerprint=fingerprint,
                       token=f"<{path.stem}>", token_names=[f"<{path.stem}>"])
    return save_concept(path, Concept(meta, {"unet.x": state}, torch.zeros(1, 4)))


def _use(path: Path, band: int, rank: int) -> BandUse:
    path.write_bytes(b"")  # only its existence matters to the registry
    return BandUse(band, rank, f"<{path.stem}>", str(path))


def test_auto_takes_the_lowest_band_free_of_every_column(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    register_band(FP, _use(tmp_path / "a.safetensors", 0, 4), cache)
    register_band(FP, _use(tmp_path / "b.safetensors", 2, 4), cache)  # columns 8..11
    assert choose_band("auto", 4, FP, tmp_path / "new.safetensors", cache_dir=cache) == 1
    assert choose_band("auto", 8, FP, tmp_path / "new.safetensors", cache_dir=cache) == 2  # 0..7 and 8..15 taken
    assert choose_band("auto", 4, "another-base", tmp_path / "new.safetensors", cache_dir=cache) == 0
    # Re-training a.safetensors does not count its own old band as taken.
    assert choose_band("auto", 4, FP, tmp_path / "a.safetensors", cache_dir=cache) == 0


def test_deleted_concepts_free_their_band_and_entries_are_replaced(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    a = _use(tmp_path / "a.safetensors", 0, 4)
    register_band(FP, a, cache)
    register_band(FP, _use(tmp_path / "b.safetensors", 1, 4), cache)
    Path(a.path).unlink()
    assert [u.token for u in used_bands(FP, cache_dir=cache)] == ["<b>"]
    assert choose_band("auto", 4, FP, tmp_path / "c.safetensors", cache_dir=cache) == 0
    register_band(FP, _use(tmp_path / "b.safetensors", 3, 4), cache)  # b retrained in band 3: one entry
    data = json.loads(registry_path(FP, cache).read_text())
    assert [(c["band"], c["token"]) for c in data["concepts"]] == [(3, "<b>")]  # stale a dropped on write
    assert data["fingerprint"] == FP and not list(registry_path(FP, cache).parent.glob(".*tmp"))


def test_concepts_dir_is_read_from_file_headers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "concepts"
    folder.mkdir()
    _concept_file(folder / "dog.safetensors", 0, 4)
    _concept_file(folder / "cat.safetensors", 1, 4)
    _concept_file(folder / "other_base.safetensors", 2, 4, fingerprint="ffffffffffffffff")
    _concept_file(folder / "lora.safetensors", None, 4, variant="lora")
    (folder / "not_a_concept.safetensors").write_bytes(b"junk")
    with caplog.at_level(logging.WARNING):
        uses = used_bands(FP, folder, cache_dir=tmp_path / "cache")
    assert [(u.band, u.token) for u in uses] == [(0, "<dog>"), (1, "<cat>")]
    assert any("not_a_concept.safetensors" in r.getMessage() for r in caplog.records)
    assert choose_band("auto", 4, FP, tmp_path / "new.safetensors", folder, tmp_path / "cache") == 2


def test_explicit_band_is_kept_but_an_overlap_is_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache"
    register_band(FP, _use(tmp_path / "a.safetensors", 1, 4), cache)
    with caplog.at_level(logging.WARNING):
        assert choose_band(0, 8, FP, tmp_path / "new.safetensors", cache_dir=cache) == 0
    assert "overlaps <a>" in caplog.text and "cannot be fused" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert choose_band(2, 4, FP, tmp_path / "new.safetensors", cache_dir=cache) == 2
    assert caplog.text == ""


def test_unreadable_registry_is_ignored_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache"
    path = registry_path(FP, cache)
    path.parent.mkdir(parents=True)
    path.write_text("{ not json")
    with caplog.at_level(logging.WARNING):
        assert choose_band("auto", 4, FP, tmp_path / "n.safetensors", cache_dir=cache) == 0
    assert "ignoring unreadable band registry" in caplog.text
    register_band(FP, _use(tmp_path / "a.safetensors", 0, 4), cache)  # rewritten whole
    assert json.loads(path.read_text())["concepts"][0]["token"] == "<a>"


def test_default_registry_lives_beside_the_svd_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECTRAL_DIFFUSION_CACHE", str(tmp_path))
    assert registry_path(FP) == tmp_path / "bands" / f"{FP}.json"


def test_missing_concepts_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SpectralDiffusionError, match="concepts folder .* does not exist"):
        used_bands(FP, tmp_path / "nope", cache_dir=tmp_path)


def test_auto_with_every_band_taken_does_not_send_the_user_to_a_lower_band(tmp_path: Path, tiny_pipe,
                                                                             monkeypatch: pytest.MonkeyPatch,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("SPECTRAL_DIFFUSION_CACHE", str(tmp_path / "cache"))
    fingerprint = base_fingerprint(tiny_pipe.unet, tiny_pipe.text_encoder)
    for band in range(8):  # every rank-4 band the tiny model's smallest targeted layer has
        register_band(fingerprint, _use(tmp_path / f"c{band}.safetensors", band, 4))
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (16, 16), "red").save(photos / "a.png")
    config = TrainConfig(photo_dir=photos, token="<new>", class_word="dog", out=tmp_path / "new.safetensors",
                         base="unused", steps=1, rank=4, preview_images=0, checkpoint_every=0)
    with caplog.at_level(logging.INFO), pytest.raises(SpectralDiffusionError) as info:
        Trainer(config, pipe=tiny_pipe)
    message = str(info.value)
    assert message.startswith("band 8 at rank 4 needs singular vectors up to column 36") and "lower band" not in message
    assert message.endswith("only bands 0 to 7 fit it at rank 4")
    assert "--band auto: bands 0 to 7 at rank 4 are taken by <c0>, <c1>, <c2>, <c3>, <c4>, <c5>, <c6>, <c7>" \
        in caplog.text
