"""What a browser may send: names that stay inside their folder, and photo uploads checked before any training.

The app may be shared (`--share`), so everything typed or uploaded is untrusted: a concept or output name must not
reach outside its folder, and an upload must be a real, reasonably sized image (decoded here, not trusted by suffix).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.training.data import IMAGE_SUFFIXES

MAX_UPLOAD_MB = 20
MAX_UPLOADS = 64
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def child_path(root: str | Path, name: str, suffix: str = "", *, what: str = "name") -> Path:
    """`root/<name><suffix>`, refusing names that are empty, hidden, hold separators or `..`, or resolve outside root."""
    name = name.strip()
    if not _NAME.fullmatch(name) or ".." in name:
        raise SpectralDiffusionError(
            f"invalid {what} {name!r}: use 1-100 letters, digits, '.', '_' or '-' (no path separators, no '..', "
            "not starting with '.')")
    base = Path(root).resolve()
    path = (base / f"{name}{suffix}").resolve()
    if path.parent != base:
        raise SpectralDiffusionError(f"invalid {what} {name!r}: it must stay inside {base}")
    return path


def check_images(paths: Sequence[str | Path], *, max_mb: int = MAX_UPLOAD_MB, max_count: int = MAX_UPLOADS) -> list[Path]:
    """The uploaded files as paths, once each is known to be a non-empty, decodable image within the size limit."""
    if not paths:
        raise SpectralDiffusionError("upload at least one photo of the concept")
    if len(paths) > max_count:
        raise SpectralDiffusionError(f"too many photos: {len(paths)} uploaded, at most {max_count} allowed")
    checked = []
    for raw in paths:
        path = Path(raw)
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise SpectralDiffusionError(
                f"{path.name}: not an image file; upload {', '.join(sorted(IMAGE_SUFFIXES))} files")
        size = path.stat().st_size
        if size == 0:
            raise SpectralDiffusionError(f"{path.name}: the file is empty")
        if size > max_mb * 1024 * 1024:
            raise SpectralDiffusionError(f"{path.name}: {size / 2**20:.1f} MB is over the {max_mb} MB limit per photo")
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise SpectralDiffusionError(f"{path.name}: not a readable image ({exc.__class__.__name__})") from exc
        checked.append(path)
    return checked


def thumbnails(paths: Sequence[str | Path] | None, size: int = 160) -> list[tuple[Image.Image, str]]:
    """A small picture and caption (file name) per upload, for the Train tab's preview; a file that does not decode
    as an image gets a grey tile captioned as such (training refuses it with the reason, `check_images`)."""
    tiles = []
    for raw in (paths or [])[:MAX_UPLOADS]:
        path = Path(raw)
        try:
            with Image.open(path) as image:
                image.draft("RGB", (size, size))  # JPEGs decode at a reduced scale
                tile = ImageOps.contain(ImageOps.exif_transpose(image).convert("RGB"), (size, size))
            label = path.name
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError):
            tile, label = Image.new("RGB", (size, size), (72, 76, 86)), f"{path.name} (not an image)"
        tiles.append((tile, label))
    return tiles
