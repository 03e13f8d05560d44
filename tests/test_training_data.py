"""Photo folder -> training examples: real photos, every odd file a user may drop in, captions, masks, augmentation."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.testing.images import png_header
from spectral_diffusion.training import data as data_module
from spectral_diffusion.training.data import (
    MAX_PHOTO_PIXELS,
    ExampleSet,
    fill_caption,
    load_folder,
    sample_order,
)

PHOTOS = Path(__file__).parent / "data" / "photos"


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_real_photos_are_resized_and_captioned(tmp_path: Path) -> None:
    for photo in PHOTOS.glob("*.jpg"):
        shutil.copy(photo, tmp_path)
    (tmp_path / "lion.txt").write_text("a {class_word} portrait of {token}, {not a placeholder}\n")
    examples = load_folder(tmp_path, 128, "<catA>", "cat")
    assert [e.name for e in examples] == ["cheetah1.jpg", "lion.jpg"]
    assert all(e.image.mode == "RGB" and e.image.size == (128, 128) and e.mask is None for e in examples)
    assert examples[0].caption == "a photo of <catA> cat"
    assert examples[1].caption == "a cat portrait of <catA>, {not a placeholder}"
    pixels, mask, caption = ExampleSet(examples, 128).item(1, torch.Generator().manual_seed(0))
    assert pixels.shape == (3, 128, 128) and mask is None and caption == examples[1].caption
    assert -1.0 <= pixels.min() < -0.5 and 0.5 < pixels.max() <= 1.0  # a real photo spans the range


def _exif_rotated_jpeg(path: Path) -> None:
    """An 80x40 image (red left, blue right) stored with EXIF orientation 6: it displays as 40x80, red on top."""
    image = Image.new("RGB", (80, 40), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif, quality=95)


def test_odd_files_are_normalised_or_skipped_with_one_warning_each(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    _exif_rotated_jpeg(tmp_path / "rotated.jpg")
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 16, 32))  # left half fully transparent
    rgba.save(tmp_path / "cutout.png")
    Image.new("L", (32, 32), 77).save(tmp_path / "grey.png")
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(tmp_path / "print.jpg")  # CMYK red
    Image.new("RGB", (8, 8), (0, 255, 0)).save(tmp_path / "tiny.bmp")
    Image.new("I;16", (32, 32), 40000).save(tmp_path / "deep.png")
    (tmp_path / "notes.txt").write_text("not an image, no image named notes")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    good = tmp_path / "truncated.jpg"
    Image.new("RGB", (32, 32)).save(good)
    good.write_bytes(good.read_bytes()[:200])
    (tmp_path / ".DS_Store").write_bytes(b"\0\0")
    (tmp_path / "grey.txt").write_text("{token} in grey")  # a caption: no warning

    with caplog.at_level(logging.WARNING):
        examples = {e.name: e for e in load_folder(tmp_path, 32, "<x>")}
    warnings = _warnings(caplog)
    assert sorted(examples) == ["cutout.png", "deep.png", "grey.png", "print.jpg", "rotated.jpg", "tiny.bmp"]
    assert sum("notes.txt" in w and "not an image" in w for w in warnings) == 1
    assert sum("broken.png" in w and "unreadable" in w for w in warnings) == 1
    assert sum("truncated.jpg" in w and "unreadable" in w for w in warnings) == 1
    assert sum("tiny.bmp" in w and "upscaling" in w for w in warnings) == 1
    assert len(warnings) == 4

    rotated = np.asarray(examples["rotated.jpg"].image)  # 40x80 upright, short side -> 32
    assert rotated.shape == (64, 32, 3)
    assert rotated[10, 16, 0] > 200 and rotated[10, 16, 2] < 60  # red now on top
    assert rotated[54, 16, 2] > 200 and rotated[54, 16, 0] < 60
    cutout = np.asarray(examples["cutout.png"].image)
    assert (cutout[:, :12] == 255).all() and (cutout[:, 20:] == (255, 0, 0)).all()
    assert (np.asarray(examples["grey.png"].image) == 77).all()
    cmyk = np.asarray(examples["print.jpg"].image).astype(int)
    assert abs(cmyk[..., 0] - 255).max() < 8 and cmyk[..., 1:].max() < 8
    assert (np.asarray(examples["deep.png"].image) == 40000 // 256).all()
    assert examples["tiny.bmp"].image.size == (32, 32)
    assert examples["grey.png"].caption == "<x> in grey"
    assert all(e.image.mode == "RGB" for e in examples.values())


@pytest.mark.parametrize("files", [{}, {"a.png": b"not a png", "b.jpg": b"\xff\xd8junk"}])
def test_no_usable_image_is_an_error(tmp_path: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(SpectralDiffusionError, match=r"no usable image in .*jpg"):
        load_folder(tmp_path, 32, "<x>")


def test_missing_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SpectralDiffusionError, match="does not exist"):
        load_folder(tmp_path / "nope", 32, "<x>")


def _position_image(size: int) -> Image.Image:
    """Pixel value encodes the column, so crops and flips are visible in the numbers."""
    row = np.arange(size, dtype=np.uint8) * (255 // size)
    return Image.fromarray(np.tile(row, (size // 2, 1)))


def test_masks_follow_the_image_through_crop_and_flip(tmp_path: Path) -> None:
    image = _position_image(64)  # 64 wide, 32 high
    image.convert("RGB").save(tmp_path / "a.png")
    image.save(tmp_path / "a_mask.png")
    (tmp_path / "masks").mkdir()
    image.convert("RGB").save(tmp_path / "b.png")
    image.save(tmp_path / "masks" / "b.png")
    examples = load_folder(tmp_path, 32, "<x>")
    assert [e.name for e in examples] == ["a.png", "b.png"]  # a_mask.png is a mask, not an image
    data = ExampleSet(examples, 32)
    flips = set()
    for seed in range(12):
        pixels, mask, _ = data.item(seed % 2, torch.Generator().manual_seed(seed))
        assert mask is not None and mask.shape == (1, 32, 32)
        torch.testing.assert_close((pixels[:1] + 1) / 2, mask, atol=1e-6, rtol=0)
        flips.add(bool(mask[0, 0, 0] > mask[0, 0, -1]))
    assert flips == {True, False}  # both orientations happen, and the mask always matches the image


def test_augmentation_is_a_function_of_the_generator(tmp_path: Path) -> None:
    _position_image(64).convert("RGB").save(tmp_path / "a.png")
    data = ExampleSet(load_folder(tmp_path, 32, "<x>"), 32, flip=False)
    gens = lambda: [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]  # noqa: E731
    first, again = data.batch([0, 0], gens()), data.batch([0, 0], gens())
    assert torch.equal(first["pixel_values"], again["pixel_values"])
    assert torch.equal(first["pixel_values"][1], data.item(0, torch.Generator().manual_seed(4))[0])  # its own draw
    assert first["masks"].shape == (2, 1, 32, 32) and bool((first["masks"] == 1).all())
    crops = {int(data.item(0, torch.Generator().manual_seed(s))[0][0, 0, 0] * 1000) for s in range(20)}
    assert len(crops) > 3  # the crop moves
    assert all(data.item(0, torch.Generator().manual_seed(s))[0][0, 0, 0] <
               data.item(0, torch.Generator().manual_seed(s))[0][0, 0, -1] for s in range(5))  # never flipped


def test_mask_of_another_size_is_an_error(tmp_path: Path) -> None:
    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    Image.new("L", (20, 20)).save(tmp_path / "a_mask.png")
    with pytest.raises(SpectralDiffusionError, match="a_mask.png is 20x20 but a.png is 40x40"):
        load_folder(tmp_path, 32, "<x>")


def test_sample_order_is_a_reproducible_sequence_of_permutations() -> None:
    order = sample_order(5, seed=1, start=0, count=15)
    assert all(sorted(order[i:i + 5]) == list(range(5)) for i in (0, 5, 10))
    assert order[:5] != order[5:10] or order[5:10] != order[10:]
    assert sample_order(5, seed=1, start=7, count=4) == order[7:11]
    assert sample_order(5, seed=2, start=0, count=15) != order


def test_fill_caption_replaces_only_placeholders() -> None:
    assert fill_caption("a photo of {token} {class_word}", "<d>", "") == "a photo of <d>"
    assert fill_caption("{token}  {x} {class_word}", "<d>", "dog") == "<d> {x} dog"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own warning, before ours
def test_photos_too_large_or_too_elongated_are_skipped_before_decoding(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "strip.png").write_bytes(png_header(4, 40_000_000))  # 160 M pixels; upscaled: gigabytes
    (tmp_path / "huge.png").write_bytes(png_header(12_000, 12_000))  # 144 M pixels
    Image.new("RGB", (4, 100), "red").save(tmp_path / "thin.png")  # 25:1, a real decodable image
    Image.new("RGB", (64, 32), "blue").save(tmp_path / "fine.png")
    decoded = []
    real_to_rgb = data_module.to_rgb
    monkeypatch.setattr(data_module, "to_rgb", lambda image: decoded.append(image.size) or real_to_rgb(image))
    with caplog.at_level(logging.WARNING):
        examples = load_folder(tmp_path, 32, "<x>")
    assert [e.name for e in examples] == ["fine.png"] and decoded == [(64, 32)]
    assert sorted(_warnings(caplog)) == [
        f"skipping huge.png: 12000x12000 is more than {MAX_PHOTO_PIXELS} pixels; downscale it",
        f"skipping strip.png: 4x40000000 is more than {MAX_PHOTO_PIXELS} pixels; downscale it",
        "skipping thin.png: 4x100 is more elongated than 16:1; crop it",
    ]


def test_unreadable_captions_skip_their_image_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("latin", "locked", "good"):
        Image.new("RGB", (32, 32), "red").save(tmp_path / f"{name}.png")
    (tmp_path / "latin.txt").write_bytes("a caf\u00e9 photo of {token}".encode("latin-1"))
    (tmp_path / "locked.txt").write_text("a photo of {token}")
    (tmp_path / "good.txt").write_text("a good photo of {token}")
    read_text = Path.read_text

    def locked(path: Path, *args, **kwargs) -> str:
        if path.name == "locked.txt":
            raise PermissionError(13, "Permission denied", str(path))
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", locked)
    with caplog.at_level(logging.WARNING):
        examples = load_folder(tmp_path, 32, "<x>")
    assert [(e.name, e.caption) for e in examples] == [("good.png", "a good photo of <x>")]
    assert _warnings(caplog) == ["skipping latin.png: its caption latin.txt is unreadable (not UTF-8 text)",
                                 "skipping locked.png: its caption locked.txt is unreadable (Permission denied)"]
