"""Photo folder -> training examples: decoding, captions, masks and seeded augmentation.

A folder holds images (jpg, jpeg, png, webp, bmp) with optional same-name `.txt` captions and optional masks
(`<name>_mask.png` beside the image, or `masks/<name>.png`). Everything a user's phone or browser may produce is
normalised to RGB once at load time (EXIF rotation, transparency on white, grey/CMYK/16-bit); anything unreadable (an
image, or its caption) is skipped with one warning line, so a stray file never stops a run. An image's size is read
from its header before it is decoded: one of more than `MAX_PHOTO_PIXELS` pixels, or more elongated than
`MAX_ASPECT` to 1 (its upscaled copy would be huge), is skipped the same way.

Augmentation (random crop, horizontal flip) draws only from the `torch.Generator` it is given, and the data order is
a pure function of the seed and a sample counter: a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from spectral_diffusion.errors import SpectralDiffusionError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
CONCEPT_TEMPLATE = "a photo of {token} {class_word}"
PRIOR_TEMPLATE = "a photo of a {class_word}"
_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)
MAX_PHOTO_PIXELS = 128 * 2**20  # 134 M pixels: a 108 MP phone photo fits, a decompression bomb does not
MAX_ASPECT = 16  # longer side / shorter side: the copy kept for training is at most 16 x resolution^2 pixels


@dataclass(frozen=True)
class Example:
    """One decoded image, resized so that its shorter side equals the training resolution."""

    name: str
    image: Image.Image  # RGB
    mask: Image.Image | None  # "L", same size as `image`; 255 = subject
    caption: str


def fill_caption(text: str, token: str, class_word: str) -> str:
    """Replace `{token}` and `{class_word}` (and only those: captions may hold other braces) and tidy spaces."""
    return " ".join(text.replace("{token}", token).replace("{class_word}", class_word).split())


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB: EXIF orientation applied, transparency composited on white, grey/CMYK/16-bit converted."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _open(path: Path) -> Image.Image | None:
    """Decode fully (so truncated files fail here, not mid-training); None and one warning if unreadable, too large
    or too elongated (judged from the header, before decoding)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_PHOTO_PIXELS:
                log.warning("skipping %s: %dx%d is more than %d pixels; downscale it", path.name, width, height,
                            MAX_PHOTO_PIXELS)
                return None
            if max(width, height) > MAX_ASPECT * min(width, height):
                log.warning("skipping %s: %dx%d is more elongated than %d:1; crop it", path.name, width, height,
                            MAX_ASPECT)
                return None
            image.load()
            return to_rgb(image)
    except _DECODE_ERRORS as exc:
        log.warning("skipping %s: unreadable image (%s)", path.name, exc)
        return None


def _mask_path(image_path: Path) -> Path | None:
    for candidate in (image_path.with_name(f"{image_path.stem}_mask.png"),
                      image_path.parent / "masks" / f"{image_path.stem}.png"):
        if candidate.is_file():
            return candidate
    return None


def _resize_short_side(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    w, h = image.size
    scale = size / min(w, h)
    return image.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)


def load_folder(folder: str | Path, resolution: int, token: str, class_word: str = "",
                template: str = CONCEPT_TEMPLATE) -> list[Example]:
    """Decode every usable image in `folder` (not recursive) into an `Example`.

    Captions come from `<name>.txt` when present (with `{token}`/`{class_word}` placeholders), else from `template`.
    Raises `SpectralDiffusionError` when the folder is missing or holds no usable image.
    """
    root = Path(folder)
    if not root.is_dir():
        raise SpectralDiffusionError(f"image folder {root} does not exist")
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    image_stems = {p.stem for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
    examples = []
    for path in files:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            if not (path.suffix.lower() == ".txt" and path.stem in image_stems):
                log.warning("skipping %s: not an image (%s)", path.name, ", ".join(sorted(IMAGE_SUFFIXES)))
            continue
        if path.stem.endswith("_mask") and path.stem[: -len("_mask")] in image_stems:
            continue
        raw = _caption(path, template)
        if raw is None:
            continue
        image = _open(path)
        if image is None:
            continue
        if min(image.size) < resolution:
            log.warning("upscaling %s: %dx%d is smaller than the %d px training resolution",
                        path.name, *image.size, resolution)
        if "{token}" not in raw and token:
            log.warning("caption of %s has no {token} placeholder: the concept token is not trained on it", path.name)
        mask = _load_mask(path, image.size)
        examples.append(Example(
            name=path.name,
            image=_resize_short_side(image, resolution, Image.Resampling.BICUBIC),
            mask=None if mask is None else _resize_short_side(mask, resolution, Image.Resampling.BILINEAR),
            caption=fill_caption(raw, token, class_word),
        ))
    if not examples:
        raise SpectralDiffusionError(f"no usable image in {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return examples


def _caption(image_path: Path, template: str) -> str | None:
    """The text of `<name>.txt`, else `template`; None and one warning if that file is not readable UTF-8 text."""
    caption_file = image_path.with_suffix(".txt")
    if not caption_file.is_file():
        return template
    try:
        return caption_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc.strerror or type(exc).__name__
        log.warning("skipping %s: its caption %s is unreadable (%s)", image_path.name, caption_file.name, reason)
        return None


def _load_mask(image_path: Path, size: tuple[int, int]) -> Image.Image | None:
    mask_path = _mask_path(image_path)
    if mask_path is None:
        return None
    try:
        with Image.open(mask_path) as mask:
            if mask.width * mask.height > MAX_PHOTO_PIXELS:
                raise SpectralDiffusionError(
                    f"mask {mask_path} is {mask.width}x{mask.height}, more than {MAX_PHOTO_PIXELS} pixels")
            mask = ImageOps.exif_transpose(mask).convert("L")
    except _DECODE_ERRORS as exc:
        raise SpectralDiffusionError(f"mask {mask_path} is unreadable ({exc})") from exc
    if mask.size != size:
        raise SpectralDiffusionError(
            f"mask {mask_path.name} is {mask.size[0]}x{mask.size[1]} but {image_path.name} is {size[0]}x{size[1]}")
    return mask


def sample_order(num_items: int, seed: int, start: int, count: int) -> list[int]:
    """Items for sample slots `start .. start+count-1`: each epoch is a permutation seeded by (seed, epoch).

    A pure function of its arguments, so any position in the stream can be reproduced after a resume.
    """
    order: list[int] = []
    for slot in range(start, start + count):
        epoch, pos = divmod(slot, num_items)
        perm = np.random.default_rng([seed, epoch]).permutation(num_items)
        order.append(int(perm[pos]))
    return order


class ExampleSet:
    """Random-crop/flip augmentation of decoded `Example`s into tensors, drawing only from the given generator."""

    def __init__(self, examples: Sequence[Example], resolution: int, flip: bool = True):
        self.examples = list(examples)
        self.resolution = resolution
        self.flip = flip

    def __len__(self) -> int:
        return len(self.examples)

    def item(self, index: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None, str]:
        """(pixels [3, R, R] in [-1, 1], mask [1, R, R] in [0, 1] or None, caption); image and mask cropped alike."""
        ex = self.examples[index]
        w, h = ex.image.size
        r = self.resolution
        left = int(torch.randint(0, w - r + 1, (1,), generator=generator))
        top = int(torch.randint(0, h - r + 1, (1,), generator=generator))
        mirror = self.flip and bool(torch.rand((), generator=generator) < 0.5)
        box = (left, top, left + r, top + r)
        pixels = _to_tensor(ex.image.crop(box)) * 2 - 1
        mask = None if ex.mask is None else _to_tensor(ex.mask.crop(box))
        if mirror:
            pixels = pixels.flip(-1)
            mask = None if mask is None else mask.flip(-1)
        return pixels, mask, ex.caption

    def batch(self, indices: Sequence[int], generators: Sequence[torch.Generator]) -> dict:
        """Stack items, each drawn from its own generator; examples without a mask get an all-ones mask so a batch
        always has one."""
        items = [self.item(i, g) for i, g in zip(indices, generators, strict=True)]
        pixels = torch.stack([p for p, _, _ in items])
        masks = torch.stack([torch.ones_like(p[:1]) if m is None else m for p, m, _ in items])
        return {"pixel_values": pixels, "masks": masks, "captions": [c for _, _, c in items]}


def _to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)
