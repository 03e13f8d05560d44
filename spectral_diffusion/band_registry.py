"""Which SVD bands of a base model are taken, so `--band auto` gives each new concept its own.

Two sources, merged: a small JSON registry per base fingerprint in the cache directory (the same root as the SVD
cache, `$SPECTRAL_DIFFUSION_CACHE` or the platform user cache dir), updated by every training run; and the concept
files of a folder the user names (`--concepts-dir`), whose metadata is read without loading their tensors. Entries
whose file is gone are ignored, so deleting a concept frees its band.

Bands are compared as singular-vector column ranges `[band*rank, (band+1)*rank)`: concepts of different ranks
conflict by columns, not by band number.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from spectral_diffusion.atomic import atomic_write
from spectral_diffusion.concept_file import read_meta
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.svd_cache import default_cache_dir

log = logging.getLogger(__name__)
REGISTRY_VERSION = 1


@dataclass(frozen=True)
class BandUse:
    """A concept file occupying `rank` columns at `band`."""

    band: int
    rank: int
    token: str
    path: str

    def overlaps(self, band: int, rank: int) -> bool:
        return self.band * self.rank < (band + 1) * rank and band * rank < (self.band + 1) * self.rank


def registry_path(fingerprint: str, cache_dir: str | Path | None = None) -> Path:
    """`<cache root>/bands/<fingerprint>.json`."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir().parent
    return root / "bands" / f"{fingerprint}.json"


def _read_registry(path: Path) -> list[BandUse]:
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [BandUse(**entry) for entry in data["concepts"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable band registry %s (%s)", path, exc)
        return []


def _scan_folder(folder: Path, fingerprint: str) -> list[BandUse]:
    """Spectral concept files in `folder` trained on the same base; unreadable files are skipped with a warning."""
    if not folder.is_dir():
        raise SpectralDiffusionError(f"concepts folder {folder} does not exist")
    found = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            meta = read_meta(path)
        except SpectralDiffusionError as exc:
            log.warning("ignoring %s for band allocation: %s", path.name, exc)
            continue
        if meta.base_fingerprint == fingerprint and meta.variant in ("additive", "rotational"):
            found.append(BandUse(meta.band, meta.rank, meta.token, str(path.resolve())))
    return found


def used_bands(fingerprint: str, concepts_dir: str | Path | None = None,
               cache_dir: str | Path | None = None) -> list[BandUse]:
    """Bands taken by live concept files of this base: registry entries whose file exists, plus `concepts_dir`."""
    uses = {u.path: u for u in _read_registry(registry_path(fingerprint, cache_dir)) if Path(u.path).is_file()}
    if concepts_dir is not None:
        uses.update({u.path: u for u in _scan_folder(Path(concepts_dir), fingerprint)})
    return sorted(uses.values(), key=lambda u: (u.band * u.rank, u.path))


def choose_band(requested: int | str, rank: int, fingerprint: str, out: str | Path,
                concepts_dir: str | Path | None = None, cache_dir: str | Path | None = None) -> int:
    """The band to train in: `requested` itself, or for "auto" the lowest band free of every other concept's columns.

    The file being (re)written, `out`, does not count as taken. An explicit band that overlaps another concept is
    allowed (the user may mean it) but warned about, since those two concepts cannot be fused.
    """
    own = str(Path(out).resolve())
    others = [u for u in used_bands(fingerprint, concepts_dir, cache_dir) if u.path != own]
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
    if band:  # if this band does not fit the model, the error that follows must not send the user to a lower one
        taken = sorted({u.token for u in others if u.band * u.rank < band * rank})
        log.info("--band auto: bands 0 to %d at rank %d are taken by %s", band - 1, rank, ", ".join(taken))
    return band


def register_band(fingerprint: str, use: BandUse, cache_dir: str | Path | None = None) -> None:
    """Record `use` (replacing any entry for the same file or a stale one), atomically."""
    path = registry_path(fingerprint, cache_dir)
    use = BandUse(use.band, use.rank, use.token, str(Path(use.path).resolve()))
    kept = [u for u in _read_registry(path) if u.path != use.path and Path(u.path).is_file()]
    data = {"version": REGISTRY_VERSION, "fingerprint": fingerprint,
            "concepts": [asdict(u) for u in sorted([*kept, use], key=lambda u: (u.band * u.rank, u.path))]}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1), encoding="utf-8"))
