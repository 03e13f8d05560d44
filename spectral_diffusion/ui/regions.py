"""The Regions table: rows of (prompt, x0, y0, x1, y1, negative prompt) <-> `regional.Region`, plus its preview.

Boxes are relative to the image (0..1), as `regional.Region` takes them, so a layout survives a size change.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

from spectral_diffusion.errors import SpectralDiffusionError, check_number
from spectral_diffusion.regional import Region, fitting_canvas

HEADERS = ["prompt", "x0", "y0", "x1", "y1", "negative prompt"]
DATATYPES = ["str", "number", "number", "number", "number", "str"]
# Two-subject layouts offered as one click: name -> boxes (x0, y0, x1, y1).
LAYOUTS: dict[str, tuple[tuple[float, float, float, float], ...]] = {
    "Left | right": ((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)),
    "Top | bottom": ((0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)),
    "Thirds": ((0.0, 0.0, 1 / 3, 1.0), (1 / 3, 0.0, 2 / 3, 1.0), (2 / 3, 0.0, 1.0, 1.0)),
}
_COLOURS = ((230, 97, 0), (93, 58, 155), (26, 133, 255), (0, 158, 115), (213, 94, 0), (204, 121, 167))


def _blank(cell: object) -> bool:
    return cell is None or (isinstance(cell, str) and not cell.strip()) or cell != cell  # NaN from pandas


def _number(cell: object, column: str, row: int) -> float:
    try:
        return float(cell)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SpectralDiffusionError(
            f"region row {row}: {column} must be a number between 0 and 1, got {cell!r}") from None


def rows_to_regions(rows: Sequence[Sequence[object]] | None, feather: float = 0.0) -> list[Region]:
    """Regions from the table; rows left entirely blank are ignored, half-filled rows are refused."""
    regions = []
    for index, row in enumerate(rows or (), start=1):
        cells = list(row) + [None] * (len(HEADERS) - len(row))
        if all(_blank(c) for c in cells):
            continue
        prompt, *box, negative = cells[: len(HEADERS)]
        if _blank(prompt):
            raise SpectralDiffusionError(f"region row {index}: enter a prompt for this region (or clear the row)")
        x0, y0, x1, y1 = (_number(v, name, index) for v, name in zip(box, HEADERS[1:5], strict=True))
        regions.append(Region(str(prompt).strip(), box=(x0, y0, x1, y1),
                              negative=None if _blank(negative) else str(negative).strip(),
                              feather=check_number(feather, "region feather", low=0)))
    return regions


def _boxes(layout: str) -> list[tuple[float, ...]]:
    """A preset layout's boxes as its rows hold them (4 decimals)."""
    return [tuple(round(v, 4) for v in box) for box in LAYOUTS[layout]]


def layout_rows(layout: str, prompts: Sequence[str]) -> list[list[object]]:
    """Rows for a preset layout, filled in order with `prompts` (blank where there are fewer prompts than boxes)."""
    boxes = _boxes(layout)
    filled = list(prompts) + [""] * len(boxes)
    return [[filled[i], *box, ""] for i, box in enumerate(boxes)]


def layout_canvas(layout: str, size: tuple[int, int], native: tuple[int, int], multiple: int,
                  largest: tuple[int, int]) -> tuple[int, int]:
    """`size` (width, height) grown where needed to the smallest canvas on which each box of `layout` spans the
    model's `native` size (so region mode auto draws them in latent windows), each side at most `largest`'s."""
    fit = fitting_canvas([Region("layout", box) for box in _boxes(layout)], native, multiple)
    width, height = (min(top, max(have, need)) for have, need, top in zip(size, fit, largest, strict=True))
    return width, height


def preview(rows: Sequence[Sequence[object]] | None, width: int, height: int, side: int = 320) -> Image.Image:
    """The image frame with each region's box outlined and numbered; invalid rows are simply not drawn."""
    scale = side / max(width, height, 1)
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    image = Image.new("RGB", (w, h), (236, 238, 241))
    draw = ImageDraw.Draw(image)
    for index, row in enumerate(rows or (), start=1):
        try:
            (region,) = rows_to_regions([row])
        except (SpectralDiffusionError, ValueError):
            continue
        x0, y0, x1, y1 = region.box
        colour = _COLOURS[(index - 1) % len(_COLOURS)]
        draw.rectangle((x0 * w, y0 * h, x1 * w - 1, y1 * h - 1), outline=colour, width=3)
        draw.text((x0 * w + 6, y0 * h + 4), f"{index}: {region.prompt[:40]}", fill=colour)
    return image
