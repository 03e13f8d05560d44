"""Adapter modules (additive, rotational, lora, ortho) and the wrapper that adds them to a frozen layer.

Every variant reports its weight change as exact factors ``dW = up @ down`` computed from its state tensors
alone, so the forward pass, merging, fusion and LoRA export share one implementation (``Adapter.factors``)
and the forward costs ``O(k (in + out))`` per token without ever rebuilding ``W``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from spectral_diffusion.adapters.config import AdapterConfig
from spectral_diffusion.bands import cayley, is_linear_map, skew_from_params, weight_matrix
from spectral_diffusion.errors import SpectralDiffusionError

Factors = tuple[torch.Tensor, torch.Tensor]


class Adapter(nn.Module):
    """One adapter of one layer, holding exactly its state tensors under their state names.

    ``layout`` names each state tensor's dimensions: ``out``/``in`` (the layer's), ``r`` (the rank) and
    ``pairs`` (``r(r-1)/2``, the free values of a skew-symmetric matrix). Frozen tensors are buffers, the
    rest trainable parameters.
    """

    variant: ClassVar[str]
    layout: ClassVar[dict[str, tuple[str, ...]]]
    optional: ClassVar[frozenset[str]] = frozenset()
    frozen: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        sizes = self.validate(state)
        self.out_features, self.in_features, self.rank = sizes["out"], sizes["in"], sizes["r"]
        self._keys = [key for key in self.layout if key in state]
        for key in self._keys:
            value = state[key].detach().clone()
            if key in self.frozen:
                self.register_buffer(key, value)
            else:
                self.register_parameter(key, nn.Parameter(value))

    @classmethod
    def validate(cls, state: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Check keys and shapes of a state dict; return its sizes (``out``, ``in``, ``r``)."""
        missing = [k for k in cls.layout if k not in cls.optional and k not in state]
        unexpected = [k for k in state if k not in cls.layout]
        if missing or unexpected:
            raise SpectralDiffusionError(
                f"{cls.variant} adapter state has missing tensors {missing} and unexpected tensors {unexpected}"
            )
        sizes: dict[str, int] = {}
        for key, dims in cls.layout.items():
            if key not in state:
                continue
            shape = tuple(state[key].shape)
            expected = tuple(
                sizes["r"] * (sizes["r"] - 1) // 2 if d == "pairs" else sizes.setdefault(d, n)
                for d, n in zip(dims, shape, strict=False)
            )
            if len(shape) != len(dims) or shape != expected:
                raise SpectralDiffusionError(
                    f"{cls.variant} adapter tensor {key!r} has shape {shape}, inconsistent with "
                    f"{dict(sizes)} (expected dimensions {dims})"
                )
        return sizes

    @staticmethod
    def factors(t: Mapping[str, torch.Tensor]) -> Factors:
        """Exact ``(up [out, k], down [k, in])`` with ``dW = up @ down``, differentiable, in ``t``'s dtype."""
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        """The live state tensors (parameters and buffers), by state name."""
        return {key: getattr(self, key) for key in self._keys}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Detached copies of everything needed to rebuild this adapter with ``type(self)(state)``."""
        return {key: t.detach().clone() for key, t in self.tensors().items()}

    def delta_factors(self) -> Factors:
        """fp32 ``(up, down)`` of this adapter's weight change (same code path as concept files)."""
        return delta_factors(self.variant, self.tensors())

    def correction(self, x: torch.Tensor, conv: nn.Conv2d | None = None) -> torch.Tensor:
        """``dW x`` for ``x [..., in]``, or for the input ``[..., in, H, W]`` of the convolution ``conv``.

        Never forms a dense ``dW``; runs in ``x``'s dtype, which must be the adapter's. A convolution's
        correction is two convolutions, ``down`` with the layer's own kernel, stride, padding and dilation and then
        ``up`` as 1x1 (LoCon's factorisation), rather than a channels-last copy of the activations.
        """
        up, down = self.factors(self.tensors())
        if conv is None:
            return F.linear(F.linear(x, down), up)
        kernel = down.reshape(down.shape[0], -1, *conv.kernel_size)
        hidden = F.conv2d(x, kernel, None, conv.stride, conv.padding, conv.dilation)
        return F.conv2d(hidden, up[:, :, None, None])

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self, self._keys[0]).dtype

    def extra_repr(self) -> str:
        return (
            f"{self.in_features} -> {self.out_features}, rank={self.rank}, trainable={self.num_trainable()}"
        )


class BandAdapter(Adapter):
    """A Spectral Adapter on one SVD band: frozen slices ``U [out,r]``, ``S [r]``, ``V [in,r]`` + trainables."""

    frozen = frozenset({"U", "S", "V"})

    @classmethod
    def from_band(
        cls, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, *, train_singular_values: bool = True
    ) -> BandAdapter:
        """A fresh adapter whose trainables are zero, so its correction is exactly zero."""
        r = s.shape[0]
        sizes = {"out": u.shape[0], "in": v.shape[0], "r": r, "pairs": r * (r - 1) // 2}
        state = {"U": u, "S": s, "V": v}
        for key, dims in cls.layout.items():
            if key not in state and (key not in cls.optional or train_singular_values):
                state[key] = u.new_zeros([sizes[d] for d in dims])
        return cls(state)


class AdditiveAdapter(BandAdapter):
    """``U' = U + A``, ``V' = V + B``, ``s' = s + c``: a rank-``2r`` change inside and around the band."""

    variant = "additive"
    layout = {
        "U": ("out", "r"),
        "S": ("r",),
        "V": ("in", "r"),
        "A": ("out", "r"),
        "B": ("in", "r"),
        "c": ("r",),
    }
    optional = frozenset({"c"})

    @staticmethod
    def factors(t: Mapping[str, torch.Tensor]) -> Factors:
        # U'S'V'^T - USV^T = U (diag(c) V^T + diag(s') B^T) + (A diag(s')) V'^T. Unlike the textbook
        # [U'S', -US][V', V]^T, no term cancels a large one: zero trainables give an exactly-zero correction
        # (bit-identical outputs at init) and small ones keep full relative precision.
        u, v, a, b = t["U"], t["V"], t["A"], t["B"]
        s_new = t["S"] + t["c"] if "c" in t else t["S"]
        inner = s_new[:, None] * b.mT
        if "c" in t:
            inner = inner + t["c"][:, None] * v.mT
        return torch.cat([u, a * s_new], dim=1), torch.cat([inner, (v + b).mT], dim=0)


class RotationalAdapter(BandAdapter):
    """``U' = U Q_u``, ``V' = V Q_v`` (Cayley rotations), ``s' = s (1 + d)``: a rank-``r`` change in the band.

    Row and column spaces of ``dW`` stay inside the band, so concepts in different bands are orthogonal.
    """

    variant = "rotational"
    layout = {
        "U": ("out", "r"),
        "S": ("r",),
        "V": ("in", "r"),
        "Ku": ("pairs",),
        "Kv": ("pairs",),
        "d": ("r",),
    }
    optional = frozenset({"d"})

    @staticmethod
    def factors(t: Mapping[str, torch.Tensor]) -> Factors:
        u, s, v = t["U"], t["S"], t["V"]
        r = s.shape[0]
        s_new = s * (1 + t["d"]) if "d" in t else s
        q_u, q_v = cayley(skew_from_params(torch.stack([t["Ku"], t["Kv"]]), r))
        core = (q_u * s_new) @ q_v.mT - torch.diag(s)
        return u @ core, v.mT


class LowRankAdapter(Adapter):
    """A LoRA-style baseline: ``dW = up @ down`` with ``up`` zero-initialised."""

    layout = {"down": ("r", "in"), "up": ("out", "r")}

    @staticmethod
    def factors(t: Mapping[str, torch.Tensor]) -> Factors:
        return t["up"], t["down"]

    @classmethod
    def initial_down(cls, in_features: int, rank: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def fresh(
        cls, out_features: int, in_features: int, rank: int, generator: torch.Generator
    ) -> LowRankAdapter:
        down = cls.initial_down(in_features, rank, generator)
        return cls({"down": down, "up": down.new_zeros(out_features, rank)})


class LoRAAdapter(LowRankAdapter):
    """Plain LoRA: ``down`` Kaiming-uniform (as nn.Linear and PEFT), both factors trained."""

    variant = "lora"

    @classmethod
    def initial_down(cls, in_features: int, rank: int, generator: torch.Generator) -> torch.Tensor:
        down = torch.empty(rank, in_features)
        return nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)


class OrthoAdapter(LowRankAdapter):
    """Orthogonal Adaptation: ``down`` is ``r`` frozen orthonormal rows, random per concept and layer.

    The rows come from the QR of a Gaussian seeded by (concept seed, layer name), so two concepts get
    different (nearly orthogonal) input subspaces; the paper's reference code reused one basis for all.
    """

    variant = "ortho"
    frozen = frozenset({"down"})

    @classmethod
    def initial_down(cls, in_features: int, rank: int, generator: torch.Generator) -> torch.Tensor:
        gaussian = torch.randn(in_features, rank, generator=generator, dtype=torch.float64)
        return torch.linalg.qr(gaussian).Q.mT.to(torch.float32).contiguous()


ADAPTER_TYPES: dict[str, type[Adapter]] = {
    cls.variant: cls for cls in (AdditiveAdapter, RotationalAdapter, LoRAAdapter, OrthoAdapter)
}


def adapter_type(variant: str) -> type[Adapter]:
    try:
        return ADAPTER_TYPES[variant]
    except KeyError:
        raise SpectralDiffusionError(
            f"unknown adapter variant {variant!r}; choose one of {', '.join(ADAPTER_TYPES)}"
        ) from None


def delta_factors(variant: str, state: Mapping[str, torch.Tensor]) -> Factors:
    """fp32 ``(up [out, k], down [k, in])`` with ``dW = up @ down``, from a variant's state tensors alone.

    ``k`` is ``2r`` for additive and ``r`` for rotational, lora and ortho. Validates the state (concept
    files arrive here), then runs the same ``factors`` as the live module's forward.
    """
    cls = adapter_type(variant)
    cls.validate(state)
    return cls.factors({key: t.float() for key, t in state.items()})


def layer_generator(seed: int, layer_name: str) -> torch.Generator:
    """A CPU generator seeded from (seed, layer name): deterministic, different for every layer and seed."""
    digest = hashlib.sha256(f"{seed}:{layer_name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def create_adapter(
    config: AdapterConfig,
    layer_name: str,
    weight_shape: tuple[int, int],
    band_svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> Adapter:
    """A freshly initialised adapter for one layer; spectral variants need the band's ``(U, S, V)`` slices."""
    cls = adapter_type(config.variant)
    if issubclass(cls, BandAdapter):
        if band_svd is None:
            raise ValueError(f"{config.variant} adapters need the band SVD of {layer_name}")
        return cls.from_band(*band_svd, train_singular_values=config.train_singular_values)
    assert issubclass(cls, LowRankAdapter)
    return cls.fresh(*weight_shape, config.rank, layer_generator(config.seed, layer_name))


class AdapterLayer(nn.Module):
    """A frozen Linear / Conv2d plus any number of named adapters, each with its own scale.

    ``forward = base(x) + sum(scale_i * correction_i(x))`` over adapters with a nonzero scale; corrections run in
    each adapter's dtype. The base weight is never written here: fusing into it is `fusion.fuse`'s (through
    `merge_delta`), and undoing a fuse copies back the weights kept before it (`pipeline.unfuse_concepts`).

    ``AdapterLayer(linear)`` is a ``LinearAdapterLayer``, an ``nn.Linear`` (``AdapterLayer(conv)`` likewise an
    ``nn.Conv2d``), and attributes it lacks (``weight``, ``in_features``, ``kernel_size``, ...) are the base layer's:
    code that takes it for the layer it wraps gets what it needs. diffusers reads ``attn.to_q.weight.dtype``, and
    PEFT (diffusers' ``load_lora_weights``) wraps it in a LoRA layer as it would the plain layer, so LoRAs load after
    live concepts as they do before them (the adapter functions see through PEFT's layers, ``targets``).

    With ``merge_live`` set (inference with frozen adapters, e.g. live composition), the forward instead runs the
    base layer once with a dense weight ``W + sum scale_i dW_i``, so N concepts cost what the base costs. That
    weight is a separate tensor rebuilt from the untouched base weight (adapters in insertion order) whenever a
    scale, an adapter, or the base weight changes, never patched: it depends only on the current state, not on
    the history of changes, and the base weight is never written. It costs one more copy of the layer's weight.
    """

    def __new__(cls, base: nn.Module | None = None) -> AdapterLayer:
        if cls is AdapterLayer:
            cls = Conv2dAdapterLayer if isinstance(base, nn.Conv2d) else LinearAdapterLayer
        return super().__new__(cls)

    def __init__(self, base: nn.Module) -> None:
        nn.Module.__init__(self)  # not the Linear / Conv2d one: the base layer holds the weights
        weight_matrix(base)  # refuses layers the band math does not cover
        self.base = base
        self.adapters = nn.ModuleDict()
        self.scales: dict[str, float] = {}
        self.merge_live = False
        self._changes = 0  # counts changes of the adapter set: part of the dense weight's cache key
        self._live_weight: tuple[tuple, torch.Tensor] | None = None  # (cache key, dense weight)

    @property
    def weight(self) -> torch.Tensor:
        # Who takes the weight from the wrapper may write it in place behind the cache's back: PEFT fuses a LoRA
        # through `.data`, which bumps no version. The dense live weight is rebuilt on the next step.
        self._live_weight = None
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base")
            if base is None:
                raise
            return getattr(base, name)

    def _adapter(self, name: str) -> Adapter:
        if name not in self.adapters:
            raise SpectralDiffusionError(
                f"no adapter named {name!r} on this layer (has: {list(self.adapters)})"
            )
        return self.adapters[name]

    def add_adapter(self, name: str, adapter: Adapter, scale: float = 1.0) -> None:
        if name in self.adapters:
            raise SpectralDiffusionError(f"an adapter named {name!r} is already on this layer")
        shape = tuple(weight_matrix(self.base).shape)
        if (adapter.out_features, adapter.in_features) != shape:
            raise SpectralDiffusionError(
                f"adapter {name!r} is for a {adapter.out_features}x{adapter.in_features} weight, "
                f"but the layer is {shape[0]}x{shape[1]}"
            )
        self.adapters[name] = adapter
        self.scales[name] = float(scale)
        self._changes += 1

    def set_scale(self, name: str, scale: float) -> None:
        self._adapter(name)
        self.scales[name] = float(scale)

    def remove_adapter(self, name: str) -> None:
        """Drop an adapter (the base weight was never written)."""
        self._adapter(name)
        del self.adapters[name]
        del self.scales[name]
        self._changes += 1
        self._live_weight = None

    def _live_names(self) -> list[str]:
        """Adapters the forward applies: those with a nonzero scale."""
        return [name for name in self.adapters if self.scales[name] != 0.0]

    def live_weight(self) -> torch.Tensor | None:
        """The dense ``W + sum scale_i dW_i`` over the live adapters (None when there are none), cached for the
        current scales, adapter set and base weight (scales set back reuse it); summed in fp32 in one
        product, in insertion order. Adapter tensors are taken as frozen (edits in place are not seen): inference."""
        weight = self.base.weight
        key = (self._changes, tuple(self.scales.values()), weight.data_ptr(), weight._version, weight.dtype,
               weight.device)
        if self._live_weight is not None and self._live_weight[0] == key:
            return self._live_weight[1]
        names = self._live_names()
        if not names:
            self._live_weight = None
            return None
        self._live_weight = None  # free the stale copy before building the new one
        with torch.no_grad():
            factors = [self.adapters[name].delta_factors() for name in names]
            up = torch.cat([u * self.scales[name] for name, (u, _) in zip(names, factors, strict=True)], dim=1)
            down = torch.cat([d for _, d in factors], dim=0)
            base = weight_matrix(self.base)
            dense = torch.addmm(base.float(), up.to(base.device), down.to(base.device)).to(weight.dtype)
        self._live_weight = (key, dense.view_as(weight))
        return self._live_weight[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merge_live:
            weight = self.live_weight()
            if weight is None:
                return self.base(x)
            if isinstance(self.base, nn.Conv2d):
                return self.base._conv_forward(x, weight, self.base.bias)
            return F.linear(x, weight, self.base.bias)
        y = self.base(x)
        conv = self.base if isinstance(self.base, nn.Conv2d) else None
        for name in self._live_names():
            adapter, scale = self.adapters[name], self.scales[name]
            correction = adapter.correction(x.to(adapter.dtype), conv)
            y = torch.add(y, correction.to(y.dtype), alpha=scale)
        return y


class LinearAdapterLayer(AdapterLayer, nn.Linear):
    """An `AdapterLayer` around an `nn.Linear`."""


class Conv2dAdapterLayer(AdapterLayer, nn.Conv2d):
    """An `AdapterLayer` around an `nn.Conv2d`."""


@torch.no_grad()
def merge_delta(module: nn.Module, delta: torch.Tensor) -> None:
    """Add a dense ``dW [out, in]`` into the weight of `module` (or of the layer a wrapper holds) in place, cast to
    the weight's dtype: the one way a weight change is written into a base weight (`fusion.fuse`'s merged delta)."""
    weight = weight_matrix(unwrap(module))
    weight += delta.to(weight.dtype)


def unwrap(module: nn.Module) -> nn.Module:
    """The base layer of an AdapterLayer, or the module itself."""
    return module.base if isinstance(module, AdapterLayer) else module


def is_adaptable(module: nn.Module) -> bool:
    """True for layers adapters can wrap, and for existing wrappers (which take more adapters)."""
    return isinstance(module, AdapterLayer) or is_linear_map(module)
