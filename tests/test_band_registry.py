"""`--band auto`: decided from one concepts folder (default: the output's), nothing machine-wide; ranks, odd files,
and a clash between folders left to fusion's clear error."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from spectral_diffusion.band_registry import choose_band, used_bands
from spectral_diffusion.concept_file import Concept, ConceptMeta, save_concept
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.fingerprint import base_fingerprint
from spectral_diffusion.fusion import fuse
from spectral_diffusion.testing.tiny_sd import random_concept
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


def test_auto_takes_the_lowest_band_free_of_every_column_in_the_out_folder(tmp_path: Path) -> None:
    _concept_file(tmp_path / "a.safetensors", 0, 4)
    _concept_file(tmp_path / "b.safetensors", 2, 4)  # columns 8..11
    assert choose_band("auto", 4, FP, tmp_path / "new.safetensors") == 1
    assert choose_band("auto", 8, FP, tmp_path / "new.safetensors") == 2  # 0..7 and 8..15 taken
    assert choose_band("auto", 4, "another-base", tmp_path / "new.safetensors") == 0
    # Re-training a.safetensors does not count its own old band as taken.
    assert choose_band("auto", 4, FP, tmp_path / "a.safetensors") == 0
    # Nothing outside the folder counts: another folder (or one not made yet) starts at band 0.
    assert choose_band("auto", 4, FP, tmp_path / "elsewhere" / "new.safetensors") == 0
    (tmp_path / "a.safetensors").unlink()  # a deleted concept frees its band
    assert choose_band("auto", 4, FP, tmp_path / "new.safetensors") == 0


def test_the_choice_is_logged_with_the_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _concept_file(tmp_path / "a.safetensors", 0, 4)
    with caplog.at_level(logging.INFO):
        assert choose_band("auto", 4, FP, tmp_path / "new.safetensors") == 1
    assert f"--band auto: band 1, the lowest free at rank 4 among the 1 concept(s) of this base in {tmp_path} " \
           "(taken by <a>)" in caplog.text


def test_concepts_dir_is_read_from_file_headers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "concepts"
    folder.mkdir()
    _concept_file(folder / "dog.safetensors", 0, 4)
    _concept_file(folder / "cat.safetensors", 1, 4)
    _concept_file(folder / "other_base.safetensors", 2, 4, fingerprint="ffffffffffffffff")
    _concept_file(folder / "lora.safetensors", None, 4, variant="lora")
    save_file({"<dog>": torch.zeros(1, 4)}, folder / "<dog>.safetensors")  # an exported embedding: passed over
    (folder / "not_a_concept.safetensors").write_bytes(b"junk")
    with caplog.at_level(logging.WARNING):
        uses = used_bands(FP, folder)
    assert [(u.band, u.token) for u in uses] == [(0, "<dog>"), (1, "<cat>")]
    assert [r.getMessage().split(" for ")[0] for r in caplog.records] == ["ignoring not_a_concept.safetensors"]
    assert choose_band("auto", 4, FP, tmp_path / "new.safetensors", folder) == 2


def test_explicit_band_is_kept_but_an_overlap_is_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _concept_file(tmp_path / "a.safetensors", 1, 4)
    with caplog.at_level(logging.WARNING):
        assert choose_band(0, 8, FP, tmp_path / "new.safetensors") == 0
    assert "overlaps <a>" in caplog.text and "cannot be fused" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert choose_band(2, 4, FP, tmp_path / "new.safetensors") == 2
    assert caplog.text == ""


def test_missing_concepts_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SpectralDiffusionError, match="concepts folder .* does not exist"):
        used_bands(FP, tmp_path / "nope")


def test_concepts_of_two_folders_share_a_band_and_fusing_them_is_refused(tmp_path: Path, tiny_pipe) -> None:
    one, two = (random_concept(tiny_pipe, token=t, band=choose_band("auto", 4, FP, tmp_path / d / "c.safetensors"))
                for t, d in (("<dog>", "one"), ("<cat>", "two")))
    assert one.meta.band == two.meta.band == 0
    with pytest.raises(SpectralDiffusionError, match=r"<dog> \(band 0, rank 4\) and <cat> \(band 0, rank 4\) "
                                                     r"share singular-vector columns"):
        fuse([one, two], tiny_pipe)


def test_auto_with_every_band_taken_does_not_send_the_user_to_a_lower_band(tmp_path: Path, tiny_pipe,
                                                                             monkeypatch: pytest.MonkeyPatch,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("SPECTRAL_DIFFUSION_CACHE", str(tmp_path / "cache"))
    fingerprint = base_fingerprint(tiny_pipe.unet, tiny_pipe.text_encoder)
    for band in range(8):  # every rank-4 band the tiny model's smallest targeted layer has
        _concept_file(tmp_path / f"c{band}.safetensors", band, 4, fingerprint=fingerprint)
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
    assert "--band auto: band 8, the lowest free at rank 4 among the 8 concept(s) of this base in " in caplog.text
    assert "(taken by <c0>, <c1>, <c2>, <c3>, <c4>, <c5>, <c6>, <c7>)" in caplog.text
