"""Training checkpoints that a resumed run continues from bit for bit.

A checkpoint is one `step-NNNNNN.pt` file in `<out>.ckpt/`: the trainable tensors, optimizer, LR-scheduler and
grad-scaler states, the RNG states of torch/numpy/python, the step reached and the settings that must not change
on resume. Data order and noise are functions of (seed, step), so the step is all the data position there is.
Files are written to a temp name and renamed, and the newest two are kept, so a crash while writing (or a disk
that fills up) never leaves a run without a readable checkpoint.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spectral_diffusion.atomic import atomic_write
from spectral_diffusion.errors import SpectralDiffusionError

log = logging.getLogger(__name__)
KEEP = 2


def checkpoint_dir(out: str | Path) -> Path:
    """`dogA.safetensors` -> `dogA.safetensors.ckpt/`."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def rng_states() -> dict[str, Any]:
    """Global RNG states, in types that `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate((states["python"][0], tuple(states["python"][1]), states["python"][2]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(directory: Path, step: int, state: dict[str, Any]) -> Path:
    """Write `state` (plus RNG states) as `step-NNNNNN.pt`, keeping only the newest `KEEP` checkpoints."""
    payload = {**state, "step": step, "rng": rng_states()}
    path = atomic_write(directory / f"step-{step:06d}.pt", lambda tmp: torch.save(payload, tmp))
    for old in _checkpoints(directory)[:-KEEP]:
        old.unlink(missing_ok=True)
    return path


def _checkpoints(directory: Path) -> list[Path]:
    return sorted(directory.glob("step-*.pt")) if directory.is_dir() else []


def load_latest(directory: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint in `directory` (an unreadable one is skipped with a warning), or None."""
    for path in reversed(_checkpoints(directory)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # any damage to the file means: fall back to the previous one
            log.warning("skipping unreadable checkpoint %s (%s)", path.name, exc)
            continue
        state["path"] = str(path)
        return state
    return None


def check_same_settings(saved: dict[str, Any], current: dict[str, Any], directory: Path) -> None:
    """Refuse to resume with settings that would make the result differ from an uninterrupted run."""
    changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in current.items() if saved.get(k) != v]
    if changed:
        raise SpectralDiffusionError(
            f"cannot resume from {directory}: settings changed ({'; '.join(changed)}); "
            "use the original settings or delete the checkpoint folder")
