"""The concept picker's data: every concept file in the concepts folder, with what its trainer's sidecar adds.

A concept is `<name>.safetensors` (its header is read, never its tensors: listing stays instant with hundreds of
files) plus the optional `<name>.json` sidecar written by the trainer (`sidecar.py`: trigger words, recommended weight,
base model, preview image; else `<name>.preview.png` beside it, which the app renders for a concept without
one). Files that are not concept files (an exported LoRA kept in the same folder) are skipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from spectral_diffusion.concept_file import read_meta
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.sidecar import read_sidecar
from spectral_diffusion.training.config import preview_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConceptInfo:
    """One concept as the UI shows it."""

    name: str
    path: Path
    token: str
    triggers: tuple[str, ...]
    class_word: str
    variant: str
    rank: int
    band: int | None
    base_fingerprint: str
    base_model: str
    weight: float
    preview: Path | None

    def summary(self, base_fingerprint: str = "") -> str:
        """One line for captions: trigger, band, and a warning when the concept was trained on another base."""
        parts = [" ".join(self.triggers), f"band {self.band}" if self.band is not None else self.variant]
        if base_fingerprint and base_fingerprint != self.base_fingerprint:
            parts.append("⚠ other base model")
        return " · ".join(parts)


def read_concept_info(path: str | Path) -> ConceptInfo:
    """The listing entry of one concept file (its header plus its sidecar, if there is a readable one)."""
    path = Path(path)
    meta = read_meta(path)
    sidecar = read_sidecar(path)
    return ConceptInfo(
        name=path.stem,
        path=path,
        token=meta.token,
        triggers=sidecar.trigger_words or (meta.token,),
        class_word=meta.class_word,
        variant=meta.variant,
        rank=meta.rank,
        band=meta.band,
        base_fingerprint=meta.base_fingerprint,
        base_model=sidecar.base_model,
        weight=sidecar.recommended_weight,
        preview=sidecar.preview or (preview_path(path) if preview_path(path).is_file() else None),
    )


def list_concepts(folder: str | Path) -> list[ConceptInfo]:
    """Concept files directly in `folder`, sorted by name; a missing folder holds none."""
    found = []
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            found.append(read_concept_info(path))
        except SpectralDiffusionError as exc:
            log.info("not listing %s: %s", path.name, exc)
    return found
