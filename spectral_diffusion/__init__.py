"""spectral-diffusion: multi-concept customization of Stable Diffusion 1.x with Spectral Adapters.

The public API, importable from the package root; names load on first use, so `import spectral_diffusion`
stays light (torch, diffusers and gradio are imported only by what needs them).

    from spectral_diffusion import load_base, TrainConfig, train, load_concept_weights, generate, GenerationSettings
"""

from __future__ import annotations

import importlib
from typing import Any

from spectral_diffusion.errors import SpectralDiffusionError

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # adapters: config + layers + injection (the PEFT pattern)
    "AdapterConfig": "adapters.config",
    "AdapterLayer": "adapters.layers",
    "delta_factors": "adapters.layers",
    "inject_adapters": "adapters.inject",
    "load_adapter": "adapters.inject",
    "remove_adapters": "adapters.inject",
    "find_targets": "adapters.targets",
    "SVDCache": "svd_cache",
    "base_fingerprint": "fingerprint",
    # files and models
    "Concept": "concept_file",
    "ConceptMeta": "concept_file",
    "load_concept": "concept_file",
    "save_concept": "concept_file",
    "export_lora": "export",
    "load_base": "models",
    "BaseSpec": "models",
    "LoadedBase": "models",
    "save_single_file": "single_file",
    # training
    "TrainConfig": "training.config",
    "train": "training.trainer",
    "add_concept_tokens": "tokens",
    # fusion and generation
    "fuse": "fusion",
    "save_fused": "fusion",
    "FusionReport": "fusion",
    "Composer": "compose",
    # concepts on a loaded pipeline, beside diffusers' load_lora_weights / set_adapters / fuse_lora
    "load_concept_weights": "pipeline",
    "set_concept_weights": "pipeline",
    "get_concept_weights": "pipeline",
    "unload_concept_weights": "pipeline",
    "fuse_concepts": "pipeline",
    "unfuse_concepts": "pipeline",
    "prompt_tags": "pipeline",
    "GenerationSettings": "generation",
    "generate": "generation",
    "save_images": "generation",
    "Region": "regional",
    "parse_region": "regional",
    "regional_prompting": "regional",
}

__all__ = ["SpectralDiffusionError", "__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'spectral_diffusion' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"spectral_diffusion.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value

