"""Spectral Adapter layers (additive, rotational) and the LoRA / orthogonal-adaptation baselines."""

from spectral_diffusion.adapters.config import SPECTRAL_VARIANTS, VARIANTS, AdapterConfig
from spectral_diffusion.adapters.inject import (
    adapter_layers,
    adapter_state,
    conv_kernels,
    inject_adapters,
    load_adapter,
    remove_adapters,
    trainable_parameters,
)
from spectral_diffusion.adapters.layers import (
    ADAPTER_TYPES,
    Adapter,
    AdapterLayer,
    AdditiveAdapter,
    LoRAAdapter,
    OrthoAdapter,
    RotationalAdapter,
    delta_factors,
)
from spectral_diffusion.adapters.targets import PRESETS, find_targets

__all__ = [
    "ADAPTER_TYPES",
    "PRESETS",
    "SPECTRAL_VARIANTS",
    "VARIANTS",
    "Adapter",
    "AdapterConfig",
    "AdapterLayer",
    "AdditiveAdapter",
    "LoRAAdapter",
    "OrthoAdapter",
    "RotationalAdapter",
    "adapter_layers",
    "adapter_state",
    "conv_kernels",
    "delta_factors",
    "find_targets",
    "inject_adapters",
    "load_adapter",
    "remove_adapters",
    "trainable_parameters",
]
