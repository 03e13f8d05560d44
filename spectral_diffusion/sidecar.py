"""The sidecar `<concept>.json` beside a concept file: what a listing shows without opening the concept file.

The trainer writes it (`write_sidecar`), the app and other tools read it (`read_sidecar`); docs/training.md shows the
format. The concept file's own metadata is authoritative: the sidecar is a convenience copy plus display details
(trigger words, recommended weight, base model spec, preview image), so a missing or unreadable one is no error.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from spectral_diffusion.atomic import atomic_write
from spectral_diffusion.concept_file import ConceptMeta, canonical_token

log = logging.getLogger(__name__)


def sidecar_path(concept: str | Path) -> Path:
    """`dogA.safetensors` -> `dogA.json`."""
    return Path(concept).with_suffix(".json")


@dataclass(frozen=True)
class Sidecar:
    """What a sidecar adds to a concept's listing; the defaults stand for a missing or unreadable one."""

    trigger_words: tuple[str, ...] = ()  # empty: the concept file's token
    recommended_weight: float = 1.0
    base_model: str = ""  # the `--base` spec it was trained on
    preview: Path | None = None  # an image beside the concept file, if it exists


def write_sidecar(concept: str | Path, meta: ConceptMeta, *, example_prompt: str, base_model: str, steps: int,
                  images: int, preview: Path | None) -> Path:
    """Write (atomically) the sidecar of the concept file `concept` with metadata `meta`; `preview` must lie beside
    it (the sidecar names it by file name only)."""
    concept = Path(concept)
    fields = {
        "name": concept.stem,
        "concept_file": concept.name,
        "trigger_words": [meta.token],
        "token": meta.token,
        "token_names": list(meta.token_names),
        "class_word": meta.class_word,
        "example_prompt": example_prompt,
        "recommended_weight": 1.0,  # spectral concepts are summed exactly, not averaged
        "base_model": base_model,
        "base_fingerprint": meta.base_fingerprint,
        "variant": meta.variant,
        "band": meta.band,
        "rank": meta.rank,
        "targets": meta.targets,
        "steps": steps,
        "images": images,
        "preview": preview.name if preview else None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    text = json.dumps(fields, indent=2, ensure_ascii=False) + "\n"
    return atomic_write(sidecar_path(concept), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_sidecar(concept: str | Path) -> Sidecar:
    """The sidecar of the concept file `concept`, or the defaults when there is none or it cannot be read (a
    warning then: it only adds display details)."""
    concept = Path(concept)
    path = sidecar_path(concept)
    if not path.is_file():
        return Sidecar()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable sidecar %s (%s)", path, exc)
        return Sidecar()
    if not isinstance(data, dict):
        return Sidecar()
    preview = data.get("preview")
    preview_path = concept.parent / Path(str(preview)).name if preview else None  # a bare name: never leaves the folder
    return Sidecar(
        trigger_words=tuple(canonical_token(str(t)) for t in data.get("trigger_words") or ()),
        recommended_weight=float(data.get("recommended_weight", 1.0)),
        base_model=str(data.get("base_model", "")),
        preview=preview_path if preview_path is not None and preview_path.is_file() else None,
    )
