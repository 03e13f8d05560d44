"""Putting adapters into a UNet / text encoder, taking them out, and reading their state back.

Target layers are replaced in place by ``AdapterLayer`` wrappers (PEFT-style); a layer that is already
wrapped takes further named adapters. Base weights are frozen and never modified except by an explicit
``AdapterLayer.merge``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from spectral_diffusion.adapters.config import AdapterConfig
from spectral_diffusion.adapters.layers import (
    AdapterLayer,
    adapter_type,
    create_adapter,
    is_adaptable,
    unwrap,
)
from spectral_diffusion.adapters.targets import adaptable_layers, components, find_targets
from spectral_diffusion.bands import band_columns, check_band_fits, conv_kernel, weight_matrix
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.svd_cache import SVDCache


def inject_adapters(
    unet: nn.Module | None,
    text_encoder: nn.Module | None,
    config: AdapterConfig,
    *,
    svd_cache: SVDCache | None = None,
    name: str = "default",
) -> dict[str, AdapterLayer]:
    """Add a fresh adapter ``name`` to every layer ``config.targets`` selects; return the wrappers by layer name.

    Every check (band fits, name free) runs before any module is touched. Spectral variants take their
    band slices from ``svd_cache`` (the default on-disk cache when None).
    """
    targets = find_targets(unet, text_encoder, config.targets)
    band = config.band if config.spectral else 0
    for layer_name, module in targets.items():
        check_band_fits(layer_name, weight_matrix(unwrap(module)).shape, band, config.rank)
        _check_name_free(layer_name, module, name)
    band_svds: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    if config.spectral:
        cache = svd_cache if svd_cache is not None else SVDCache()
        cols = band_columns(band, config.rank)
        top = cache.band_svd({n: unwrap(m) for n, m in targets.items()}, cols.stop)
        band_svds = {n: (u[:, cols], s[cols], v[:, cols]) for n, (u, s, v) in top.items()}
    wrappers = {}
    for layer_name, module in targets.items():
        weight = weight_matrix(unwrap(module))
        adapter = create_adapter(config, layer_name, tuple(weight.shape), band_svds.get(layer_name))
        wrappers[layer_name] = _wrap(unet, text_encoder, layer_name, module)
        wrappers[layer_name].add_adapter(name, adapter.to(weight.device))
    return wrappers


def load_adapter(
    unet: nn.Module | None,
    text_encoder: nn.Module | None,
    variant: str,
    layer_states: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    name: str,
    scale: float = 1.0,
) -> dict[str, AdapterLayer]:
    """Add adapter ``name`` rebuilt from stored state tensors (a concept file's layers); no SVD involved."""
    cls = adapter_type(variant)
    planned = []
    for layer_name, state in layer_states.items():
        module = _find_layer(unet, text_encoder, layer_name)
        _check_name_free(layer_name, module, name)
        adapter = cls(state)
        shape = tuple(weight_matrix(unwrap(module)).shape)
        if (adapter.out_features, adapter.in_features) != shape:
            raise SpectralDiffusionError(
                f"adapter for {layer_name} is {adapter.out_features}x{adapter.in_features} but the layer is "
                f"{shape[0]}x{shape[1]}: the concept was trained on a different base model"
            )
        planned.append((layer_name, module, adapter))
    wrappers = {}
    for layer_name, module, adapter in planned:
        wrappers[layer_name] = _wrap(unet, text_encoder, layer_name, module)
        wrappers[layer_name].add_adapter(name, adapter.to(weight_matrix(unwrap(module)).device), scale)
    return wrappers


def adapter_layers(unet: nn.Module | None, text_encoder: nn.Module | None = None) -> dict[str, AdapterLayer]:
    """Every adapter wrapper in the models, by qualified layer name."""
    return {name: m for name, m in adaptable_layers(unet, text_encoder).items() if isinstance(m, AdapterLayer)}


def remove_adapters(unet: nn.Module | None, text_encoder: nn.Module | None) -> None:
    """Put the original layers back (their parameters stay frozen)."""
    for layer_name, wrapper in adapter_layers(unet, text_encoder).items():
        _replace(unet, text_encoder, layer_name, wrapper.base)


@contextmanager
def adapter_disabled(layers: Mapping[str, AdapterLayer], name: str) -> Iterator[None]:
    """Adapter ``name`` skipped on ``layers`` while inside (scale 0, restored after): the base model's forward."""
    scales = {ln: layer.scales[name] for ln, layer in layers.items() if name in layer.adapters}
    for ln in scales:
        layers[ln].set_scale(name, 0.0)
    try:
        yield
    finally:
        for ln, scale in scales.items():
            layers[ln].set_scale(name, scale)


def adapter_state(layers: Mapping[str, AdapterLayer], name: str) -> dict[str, dict[str, torch.Tensor]]:
    """The state tensors of adapter ``name`` on every layer that has it, by layer name."""
    state = {
        ln: layer.adapters[name].state_tensors() for ln, layer in layers.items() if name in layer.adapters
    }
    if not state:
        raise SpectralDiffusionError(f"no layer has an adapter named {name!r}")
    return state


def trainable_parameters(layers: Mapping[str, AdapterLayer], name: str) -> list[nn.Parameter]:
    """The trainable parameters of adapter ``name`` across layers (what the optimizer gets)."""
    return [
        p
        for layer in layers.values()
        if name in layer.adapters
        for p in layer.adapters[name].parameters()
        if p.requires_grad
    ]


def _check_name_free(layer_name: str, module: nn.Module, name: str) -> None:
    if isinstance(module, AdapterLayer) and name in module.adapters:
        raise SpectralDiffusionError(f"layer {layer_name} already has an adapter named {name!r}")


def _split(unet: nn.Module | None, text_encoder: nn.Module | None, layer_name: str) -> tuple[nn.Module, str]:
    prefix, _, path = layer_name.partition(".")
    model = components(unet, text_encoder).get(prefix)
    if model is None or not path:
        raise SpectralDiffusionError(
            f"layer name {layer_name!r} must start with 'unet.' or 'text_encoder.' of a model that was given"
        )
    return model, path


def conv_kernels(unet: nn.Module | None, text_encoder: nn.Module | None,
                 layer_names: Iterable[str]) -> dict[str, list[int]]:
    """``[kh, kw]`` of every convolution among ``layer_names`` (Linear layers are left out): how their
    ``[out, in*kh*kw]`` factors unfold back into conv kernels, recorded in concept files for export."""
    kernels = {}
    for layer_name in layer_names:
        kernel = conv_kernel(unwrap(_find_layer(unet, text_encoder, layer_name)))
        if kernel is not None:
            kernels[layer_name] = list(kernel)
    return kernels


def _find_layer(unet: nn.Module | None, text_encoder: nn.Module | None, layer_name: str) -> nn.Module:
    model, path = _split(unet, text_encoder, layer_name)
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise SpectralDiffusionError(f"layer {layer_name} does not exist in this base model") from None
    if isinstance(module, BaseTunerLayer):  # a LoRA loaded by diffusers: the concept goes on the layer inside
        module = module.get_base_layer()
    if not is_adaptable(module):
        raise SpectralDiffusionError(
            f"layer {layer_name} is a {type(module).__name__}, not an adaptable layer"
        )
    return module


def _replace(unet: nn.Module | None, text_encoder: nn.Module | None, layer_name: str, new: nn.Module) -> None:
    """Put `new` where layer `layer_name` is: inside the PEFT LoRA layers around it, if diffusers put any there."""
    model, path = _split(unet, text_encoder, layer_name)
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    while isinstance(getattr(parent, child), BaseTunerLayer):
        parent, child = getattr(parent, child), "base_layer"
    setattr(parent, child, new)


def _wrap(
    unet: nn.Module | None, text_encoder: nn.Module | None, layer_name: str, module: nn.Module
) -> AdapterLayer:
    """The layer's wrapper, creating it (and freezing the base) on first use."""
    if isinstance(module, AdapterLayer):
        return module
    module.requires_grad_(False)
    wrapper = AdapterLayer(module)
    _replace(unet, text_encoder, layer_name, wrapper)
    return wrapper
