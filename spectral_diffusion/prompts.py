"""Prompt lists read from text files: closed-form fusion's prior (`fuse --prior-prompts`) and training's locality
captions (`train --locality-captions`), both captions of the base model's domain, one per line."""

from __future__ import annotations

from pathlib import Path

from spectral_diffusion.errors import SpectralDiffusionError


def read_prompts(path: str | Path, flag: str = "--prior-prompts") -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped; a file that cannot be read, or holds no line, is refused
    in one line naming `flag`."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpectralDiffusionError(f"{flag} {path}: cannot read it as UTF-8 text ({exc})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise SpectralDiffusionError(f"{flag} {path}: the file holds no prompt (one per line)")
    return prompts
