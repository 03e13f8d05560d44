"""Shared fixtures: one tiny SD-1.5-shaped model per test session (a diffusers folder and an LDM single file),
and a fresh pipeline per test. Random concepts: `spectral_diffusion.testing.tiny_sd.random_concept`."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach a hub; set before diffusers is imported

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402

from spectral_diffusion.testing.tiny_sd import SINGLE_FILE_NAME, save_tiny_model  # noqa: E402

# Tiny models gain nothing from threads, and OpenMP threads on a busy shared CPU stall: a 64x32 SVD took 0.27 s
# with 2 threads and 0.4 ms with 1 on the 2-core development machine under load.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers folder of the tiny model (seed 0), with `tiny_sd.safetensors` inside. Treat as read-only."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_sd"), single_file=True, seed=0)


@pytest.fixture(scope="session")
def tiny_single_file(tiny_model_dir: Path) -> Path:
    """The same weights as `tiny_model_dir`, as one SD 1.x LDM `.safetensors` file."""
    return tiny_model_dir / SINGLE_FILE_NAME


@pytest.fixture
def tiny_pipe(tiny_model_dir: Path) -> StableDiffusionPipeline:
    """A fresh fp32 CPU pipeline loaded from `tiny_model_dir`, free to modify."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe
