"""Which SVD bands of a base model are taken, so `--band auto` gives each new concept its own.

Decided from the concepts a user is going to fuse and nothing else: the concept files of one folder (`--concepts-dir`,
by default the folder the new concept is written to), whose metadata is read without loading their tensors. The
same folder gives the same band on any machine; the choice is logged and the band is recorded in the concept file
and its sidecar. Concepts kept in different folders may share a band: fusing them is refused with a clear error
(`fusion.check_concepts`), and retraining one with `--concepts-dir` naming the other's folder resolves it.

Bands are compared as singular-vector column ranges (`bands.shared_columns`): concepts of different ranks conflict
by columns, not by band number.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from spectral_diffusion.adapters.config import SPECTRAL_VARIANTS
from spectral_diffusion.bands import band_columns, shared_columns
from spectral_diffusion.concept_file import METADATA_KEY, read_meta
from spectral_diffusion.errors import SpectralDiffusionError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BandUse:
    """A concept file occupying `rank` columns at `band`."""

    band: int
    rank: int
    token: str
    path: str

    @property
    def columns(self) -> slice:
        """The singular-vector columns it occupies."""
        return band_columns(self.band, self.rank)

    def overlaps(self, band: int, rank: int) -> bool:
        return shared_columns(self.band, self.rank, band, rank) is not None


def _is_other_file(path: Path) -> bool:
    """A readable `.safetensors` file without concept metadata (an exported LoRA or embedding): not a concept."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return METADATA_KEY not in (f.metadata() or {})
    except (SafetensorError, OSError):
        return False


def used_bands(fingerprint: str, concepts_dir: str | Path) -> list[BandUse]:
    """Bands taken by the spectral concept files of this base in `concepts_dir`; LoRA and embedding files there
    are passed over, and unreadable concept files skipped with a warning."""
    folder = Path(concepts_dir)
    if not folder.is_dir():
        raise SpectralDiffusionError(f"concepts folder {folder} does not exist")
    found = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            meta = read_meta(path)
        except SpectralDiffusionError as exc:
            if not _is_other_file(path):
                log.warning("ignoring %s for band allocation: %s", path.name, exc)
            continue
        if meta.base_fingerprint == fingerprint and meta.variant in SPECTRAL_VARIANTS:
            found.append(BandUse(meta.band, meta.rank, meta.token, str(path.resolve())))
    return sorted(found, key=lambda u: (u.columns.start, u.path))


def choose_band(requested: int | str, rank: int, fingerprint: str, out: str | Path,
                concepts_dir: str | Path | None = None) -> int:
    """The band to train in: `requested` itself, or for "auto" the lowest band free of the columns of every concept
    of this base in `concepts_dir` (default: `out`'s folder; none yet if it does not exist).

    The file being (re)written, `out`, does not count as taken. An explicit band that overlaps another concept is
    allowed (the user may mean it) but warned about, since those two concepts cannot be fused.
    """
    out = Path(out)
    folder = Path(concepts_dir) if concepts_dir is not None else out.parent
    own = str(out.resolve())
    others = [] if concepts_dir is None and not folder.is_dir() else used_bands(fingerprint, folder)
    others = [u for u in others if u.path != own]
    if requested != "auto":
        band = int(requested)
        for use in others:
            if use.overlaps(band, rank):
                log.warning("band %d at rank %d overlaps %s (%s, band %d at rank %d): they cannot be fused",
                            band, rank, use.token, use.path, use.band, use.rank)
        return band
    band = 0
    while any(u.overlaps(band, rank) for u in others):
        band += 1
    # Said even when nothing is taken: the band depends on the folder, which the user should see.
    taken = sorted({u.token for u in others if u.columns.start < band_columns(band, rank).start})
    log.info("--band auto: band %d, the lowest free at rank %d among the %d concept(s) of this base in %s%s",
             band, rank, len(others), folder, f" (taken by {', '.join(taken)})" if taken else "")
    return band
