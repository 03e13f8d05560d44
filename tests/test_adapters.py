"""Adapter layers, injection and targets on single layers and a tiny random UNet + CLIP text encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from spectral_diffusion.adapters import (
    VARIANTS,
    AdapterConfig,
    AdapterLayer,
    adapter_layers,
    adapter_state,
    delta_factors,
    find_targets,
    inject_adapters,
    load_adapter,
    remove_adapters,
    trainable_parameters,
)
from spectral_diffusion.adapters.layers import Adapter, create_adapter
from spectral_diffusion.bands import band_columns, cayley, oriented_svd, skew_from_params, weight_matrix
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.fingerprint import base_fingerprint
from spectral_diffusion.svd_cache import SVDCache

SPECTRAL = ("additive", "rotational")


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()


def tiny_text_encoder(seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=8,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def run(unet: nn.Module, text_encoder: nn.Module) -> torch.Tensor:
    """One UNet step conditioned on the text encoder: touches every adapted layer of both models."""
    gen = torch.Generator().manual_seed(123)
    ids = torch.randint(2, 64, (2, 8), generator=gen)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    return unet(latents, 10, text_encoder(ids).last_hidden_state).sample


@pytest.fixture
def cache(tmp_path: Path) -> SVDCache:
    return SVDCache(tmp_path / "svd")


def randomize(adapter: Adapter, seed: int = 0, std: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def new_adapter(variant: str, weight: torch.Tensor, rank: int = 3, band: int = 0, seed: int = 0) -> Adapter:
    config = AdapterConfig(variant=variant, rank=rank, band=band, seed=seed)
    u, s, v = oriented_svd(weight, (band + 1) * rank)
    cols = band_columns(band, rank)
    return create_adapter(config, "layer", tuple(weight.shape), (u[:, cols], s[cols], v[:, cols]))


def layer_and_input(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(20, 24), torch.randn(2, 5, 20)
    if kind == "conv":
        return nn.Conv2d(20, 24, kernel_size=1), torch.randn(2, 20, 3, 4)
    # a 3x3 conv with stride, padding and dilation: the correction must use the layer's own geometry
    return nn.Conv2d(6, 24, kernel_size=3, stride=2, padding=2, dilation=2), torch.randn(2, 6, 7, 8)


def dense(base: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(base, nn.Conv2d):
        return F.conv2d(x, weight.view(base.weight.shape), base.bias, base.stride, base.padding, base.dilation)
    return F.linear(x, weight, base.bias)


@pytest.mark.parametrize("kind", ["linear", "conv", "conv3x3"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fresh_adapter_is_bit_identical_to_base(variant: str, kind: str) -> None:
    base, x = layer_and_input(kind)
    expected = base(x)
    layer = AdapterLayer(base)
    layer.add_adapter("a", new_adapter(variant, weight_matrix(base)))
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_a_wrapper_is_the_layer_type_it_wraps(kind: str) -> None:
    """So PEFT (diffusers' load_lora_weights) takes a wrapped layer as it takes the plain one."""
    base, _ = layer_and_input(kind)
    layer = AdapterLayer(base)
    assert isinstance(layer, type(base)) and layer.weight is base.weight
    shape = ("in_features", "out_features") if kind == "linear" else ("in_channels", "kernel_size", "dilation")
    assert all(getattr(layer, name) == getattr(base, name) for name in shape)
    with pytest.raises(AttributeError):
        layer.no_such_attribute  # noqa: B018


@pytest.mark.parametrize("variant", VARIANTS)
def test_fresh_injection_leaves_models_bit_identical(variant: str, cache: SVDCache) -> None:
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    with torch.no_grad():
        expected = run(unet, text_encoder)
        layers = inject_adapters(
            unet,
            text_encoder,
            AdapterConfig(variant=variant, rank=4, band=1, targets="attn+ff"),
            svd_cache=cache,
        )
        assert len(layers) == 60
        assert torch.equal(run(unet, text_encoder), expected)


@pytest.mark.parametrize("kind", ["linear", "conv", "conv3x3"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_equals_dense_updated_weight(variant: str, kind: str) -> None:
    base, x = layer_and_input(kind)
    layer = AdapterLayer(base)
    adapter = new_adapter(variant, weight_matrix(base), band=1)
    randomize(adapter)
    layer.add_adapter("a", adapter, scale=0.7)
    up, down = adapter.delta_factors()
    expected = dense(base, weight_matrix(base) + 0.7 * up @ down, x)
    assert not torch.allclose(expected, base(x), atol=1e-3)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("variant", "max_rank"), [("additive", 6), ("rotational", 3)])
def test_delta_rank_bound(variant: str, max_rank: int) -> None:
    weight = torch.randn(24, 20, generator=torch.Generator().manual_seed(0))
    adapter = new_adapter(variant, weight, rank=3, band=2)
    randomize(adapter)
    up, down = adapter.delta_factors()
    assert up.shape == (24, max_rank) and down.shape == (max_rank, 20)
    assert torch.linalg.matrix_rank(up.double() @ down.double()) == max_rank


def band_replaced(
    variant: str, t: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The band's new (U', s', V'), written straight from the method (docs/architecture.md), not from ``factors``."""
    if variant == "additive":
        return t["U"] + t["A"], t["S"] + t["c"], t["V"] + t["B"]
    r = t["S"].shape[0]
    q_u, q_v = cayley(skew_from_params(t["Ku"], r)), cayley(skew_from_params(t["Kv"], r))
    return t["U"] @ q_u, t["S"] * (1 + t["d"]), t["V"] @ q_v


@pytest.mark.parametrize("variant", SPECTRAL)
def test_fusing_disjoint_bands_equals_rebuilding_from_svd(variant: str) -> None:
    weight = torch.randn(24, 20, generator=torch.Generator().manual_seed(0))
    u, s, v = oriented_svd(weight, 20)
    fused = weight.clone()
    for seed, band in enumerate((0, 2)):
        adapter = new_adapter(variant, weight, rank=3, band=band)
        randomize(adapter, seed=seed)
        up, down = adapter.delta_factors()
        fused += up @ down
        cols = band_columns(band, 3)
        u[:, cols], s[cols], v[:, cols] = band_replaced(variant, adapter.state_tensors())
    torch.testing.assert_close(fused, u @ torch.diag(s) @ v.T, atol=1e-5, rtol=1e-5)


def test_rotational_deltas_in_different_bands_are_orthogonal() -> None:
    weight = torch.randn(24, 20, generator=torch.Generator().manual_seed(0))
    deltas = []
    for seed, band in enumerate((0, 1, 3)):
        adapter = new_adapter("rotational", weight, rank=4, band=band)
        randomize(adapter, seed=seed, std=0.5)
        up, down = adapter.delta_factors()
        deltas.append(up @ down)
    for i in range(3):
        for j in range(i + 1, 3):
            assert deltas[i].norm() > 0.1
            torch.testing.assert_close(deltas[i].T @ deltas[j], torch.zeros(20, 20), atol=1e-5, rtol=0)
            torch.testing.assert_close(deltas[i] @ deltas[j].T, torch.zeros(24, 24), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "conv", "conv3x3"])
def test_merge_live_equals_the_live_path_and_never_writes_the_base_weight(kind: str) -> None:
    base, x = layer_and_input(kind)
    original = base.weight.detach().clone()
    layer = AdapterLayer(base)
    for i, variant in enumerate(("additive", "rotational")):
        adapter = new_adapter(variant, weight_matrix(base), band=i, seed=i)
        randomize(adapter, seed=i)
        layer.add_adapter(variant, adapter, scale=0.7 - i)
    live = layer(x)
    layer.merge_live = True
    merged = layer(x)
    torch.testing.assert_close(merged, live, atol=1e-5, rtol=1e-5)
    assert torch.equal(base.weight, original)  # the dense weight is a separate tensor
    first = layer.live_weight().clone()
    layer.set_scale("additive", 2.0)  # a change rebuilds from the base weight ...
    changed = layer(x)
    layer.merge_live = False
    torch.testing.assert_close(changed, layer(x), atol=1e-5, rtol=1e-5)
    layer.merge_live = True
    layer.set_scale("additive", 0.7)  # ... so going back gives the first weight bit for bit (no float history)
    assert torch.equal(layer.live_weight(), first) and torch.equal(layer(x), merged)
    layer.merge_live = False
    assert torch.equal(layer(x), live)
    layer.set_scale("additive", 0.0)
    layer.set_scale("rotational", 0.0)
    layer.merge_live = True
    assert layer.live_weight() is None and torch.equal(layer(x), base(x))


def test_merge_live_follows_changes_of_the_base_weight() -> None:
    base, x = layer_and_input("linear")
    layer = AdapterLayer(base)
    adapter = new_adapter("additive", weight_matrix(base))
    randomize(adapter)
    layer.add_adapter("a", adapter)
    layer.merge_live = True
    layer(x)
    with torch.no_grad():
        base.weight.mul_(2.0)
    layer.merge_live = False
    live = layer(x)
    layer.merge_live = True
    torch.testing.assert_close(layer(x), live, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_delta_factors_from_state_equal_module_and_rebuild(variant: str) -> None:
    weight = torch.randn(24, 20, generator=torch.Generator().manual_seed(0))
    adapter = new_adapter(variant, weight, band=1)
    randomize(adapter)
    up, down = adapter.delta_factors()
    state = adapter.state_tensors()
    from_state = delta_factors(variant, state)
    assert torch.equal(up, from_state[0]) and torch.equal(down, from_state[1])
    rebuilt = type(adapter)(state)
    x = torch.randn(7, 20)
    assert torch.equal(rebuilt.correction(x), adapter.correction(x))
    assert rebuilt.num_trainable() == adapter.num_trainable()


def test_state_validation_messages() -> None:
    adapter = new_adapter("additive", torch.randn(24, 20))
    state = adapter.state_tensors()
    with pytest.raises(SpectralDiffusionError, match=r"missing tensors \['B'\]"):
        delta_factors("additive", {k: t for k, t in state.items() if k != "B"})
    with pytest.raises(SpectralDiffusionError, match=r"tensor 'S' has shape \(4,\)"):
        delta_factors("additive", {**state, "S": torch.zeros(4)})
    with pytest.raises(SpectralDiffusionError, match="unexpected tensors"):
        delta_factors("rotational", state)
    with pytest.raises(SpectralDiffusionError, match="unknown adapter variant 'dora'"):
        delta_factors("dora", state)


@pytest.mark.parametrize(
    ("variant", "train_sv", "expected"),
    [
        ("additive", True, 4 * (24 + 20) + 4),
        ("additive", False, 4 * (24 + 20)),
        ("rotational", True, 4 * 3 + 4),
        ("rotational", False, 4 * 3),
        ("lora", True, 4 * (24 + 20)),
        ("ortho", True, 4 * 24),
    ],
)
def test_trainable_parameter_counts(variant: str, train_sv: bool, expected: int) -> None:
    config = AdapterConfig(variant=variant, rank=4, train_singular_values=train_sv)
    u, s, v = oriented_svd(torch.randn(24, 20), 4)
    assert create_adapter(config, "layer", (24, 20), (u, s, v)).num_trainable() == expected


def test_ortho_basis_is_orthonormal_and_differs_per_concept_and_layer() -> None:
    def down(seed: int, name: str) -> torch.Tensor:
        return create_adapter(AdapterConfig(variant="ortho", rank=4, seed=seed), name, (24, 64)).down

    first = down(0, "unet.a.to_q")
    torch.testing.assert_close(first @ first.T, torch.eye(4), atol=1e-6, rtol=0)
    assert not first.requires_grad
    assert torch.equal(first, down(0, "unet.a.to_q"))
    for other in (down(1, "unet.a.to_q"), down(0, "unet.b.to_q")):
        torch.testing.assert_close(other @ other.T, torch.eye(4), atol=1e-6, rtol=0)
        # Different subspaces, not a re-signing or reordering of the same rows.
        assert torch.linalg.svdvals(first @ other.T).max() < 0.99


def test_only_adapter_parameters_get_gradients(cache: SVDCache) -> None:
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    layers = inject_adapters(unet, text_encoder, AdapterConfig(variant="additive", rank=4), svd_cache=cache)
    layers |= inject_adapters(
        unet, text_encoder, AdapterConfig(variant="rotational", rank=4, band=1), svd_cache=cache, name="rot"
    )
    run(unet, text_encoder).square().mean().backward()
    trainable = trainable_parameters(layers, "default") + trainable_parameters(layers, "rot")
    assert len(trainable) == 40 * 3 + 40 * 3
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    ids = {id(p) for p in trainable}
    assert all(p.grad is None for p in [*unet.parameters(), *text_encoder.parameters()] if id(p) not in ids)


def test_injection_freezes_wrapped_base_layers(cache: SVDCache) -> None:
    unet = tiny_unet()
    layers = inject_adapters(
        unet, None, AdapterConfig(variant="lora", targets="unet.*attn2.to_k"), svd_cache=cache
    )
    assert len(layers) == 4
    assert all(not p.requires_grad for layer in layers.values() for p in layer.base.parameters())
    assert unet.conv_in.weight.requires_grad  # everything else is the trainer's business


def test_band_too_big_is_refused_before_touching_the_model(cache: SVDCache) -> None:
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    with pytest.raises(
        SpectralDiffusionError, match=r"band 4 at rank 8 .* column 40, but layer \S+ \(.*\) has only"
    ):
        inject_adapters(unet, text_encoder, AdapterConfig(rank=8, band=4), svd_cache=cache)
    assert adapter_layers(unet, text_encoder) == {}
    assert cache.misses == 0


def test_named_adapters_share_wrappers_and_scales(cache: SVDCache) -> None:
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    with torch.no_grad():
        base_out = run(unet, text_encoder)
        first = inject_adapters(unet, text_encoder, AdapterConfig(band=0, rank=4), svd_cache=cache, name="a")
        second = inject_adapters(unet, text_encoder, AdapterConfig(band=1, rank=4), svd_cache=cache, name="b")
        assert all(first[n] is second[n] for n in first)
        for layer in first.values():
            randomize(layer.adapters["a"], seed=1)
            randomize(layer.adapters["b"], seed=2)
        both = run(unet, text_encoder)
        for layer in first.values():
            layer.set_scale("b", 0.0)
        only_a = run(unet, text_encoder)
        for layer in first.values():
            layer.remove_adapter("b")
        assert torch.equal(run(unet, text_encoder), only_a)
        assert not torch.allclose(both, only_a, atol=1e-4) and not torch.allclose(only_a, base_out, atol=1e-4)
        for layer in first.values():
            layer.set_scale("a", 0.0)
        assert torch.equal(run(unet, text_encoder), base_out)
    with pytest.raises(SpectralDiffusionError, match="already has an adapter named 'a'"):
        inject_adapters(unet, text_encoder, AdapterConfig(band=2, rank=4), svd_cache=cache, name="a")


@pytest.mark.parametrize("variant", VARIANTS)
def test_load_adapter_reproduces_trained_model(variant: str, cache: SVDCache) -> None:
    config = AdapterConfig(variant=variant, rank=4, band=1, targets="attn+ff")
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    layers = inject_adapters(unet, text_encoder, config, svd_cache=cache, name="trained")
    for i, layer in enumerate(layers.values()):
        randomize(layer.adapters["trained"], seed=i)
    state = adapter_state(layers, "trained")
    assert set(state) == set(layers)
    fresh_unet, fresh_text_encoder = tiny_unet(), tiny_text_encoder()
    loaded = load_adapter(fresh_unet, fresh_text_encoder, variant, state, name="concept", scale=1.0)
    assert set(loaded) == set(layers)
    with torch.no_grad():
        torch.testing.assert_close(
            run(fresh_unet, fresh_text_encoder), run(unet, text_encoder), atol=0, rtol=0
        )


def test_load_adapter_errors() -> None:
    unet = tiny_unet()
    state = {"up": torch.zeros(32, 2), "down": torch.zeros(2, 32)}
    with pytest.raises(SpectralDiffusionError, match=r"layer unet\.nope\.to_q does not exist"):
        load_adapter(unet, None, "lora", {"unet.nope.to_q": state}, name="c")
    with pytest.raises(SpectralDiffusionError, match="must start with 'unet.' or 'text_encoder.'"):
        load_adapter(unet, None, "lora", {"text_encoder.encoder.layers.0.mlp.fc1": state}, name="c")
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"  # 32 x 128
    with pytest.raises(SpectralDiffusionError, match="different base model"):
        load_adapter(unet, None, "lora", {name: state}, name="c")
    assert adapter_layers(unet) == {}


def test_remove_adapters_restores_original_modules(cache: SVDCache) -> None:
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    originals = find_targets(unet, text_encoder, "attn+ff")
    weights = {n: m.weight.detach().clone() for n, m in originals.items()}
    layers = inject_adapters(unet, text_encoder, AdapterConfig(targets="attn+ff", rank=4), svd_cache=cache)
    for layer in layers.values():
        randomize(layer.adapters["default"])
        assert layer.live_weight() is not None  # the dense live weight is a separate tensor
    remove_adapters(unet, text_encoder)
    assert adapter_layers(unet, text_encoder) == {}
    restored = find_targets(unet, text_encoder, "attn+ff")
    assert all(restored[n] is originals[n] for n in originals)
    for n, m in restored.items():
        assert torch.equal(m.weight, weights[n])


def test_find_targets_presets_and_patterns(cache: SVDCache) -> None:
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    attn = find_targets(unet, text_encoder, "attn")
    assert (
        len(attn) == 4 * 8 + 2 * 4
    )  # 4 transformer blocks x (attn1 + attn2) x (q, k, v, out); 2 CLIP layers x 4
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0" in attn
    assert "text_encoder.encoder.layers.1.self_attn.out_proj" in attn
    wide = find_targets(unet, text_encoder, "attn+ff")
    assert set(attn) < set(wide) and len(wide) == 60
    assert isinstance(wide["unet.down_blocks.0.attentions.0.proj_in"], nn.Conv2d)
    assert isinstance(wide["unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"], nn.Linear)
    assert len(find_targets(None, text_encoder, "attn")) == 8
    custom = find_targets(unet, text_encoder, "unet.*attn2.to_k, text_encoder.*q_proj")
    assert len(custom) == 4 + 2
    inject_adapters(unet, text_encoder, AdapterConfig(rank=2), svd_cache=cache)
    after = find_targets(unet, text_encoder, "attn")
    assert set(after) == set(attn) and all(isinstance(m, AdapterLayer) for m in after.values())
    with pytest.raises(SpectralDiffusionError, match="pattern 'unet.*attn3.to_k' matches no"):
        find_targets(unet, text_encoder, "unet.*attn2.to_k,unet.*attn3.to_k")
    with pytest.raises(SpectralDiffusionError, match="match no layer"):
        find_targets(None, None, "attn")


def test_config_validation() -> None:
    config = AdapterConfig(
        variant="rotational", rank=4, band=2, targets="attn+ff", train_singular_values=False, seed=3
    )
    assert config.spectral and not AdapterConfig(variant="lora").spectral
    for bad, message in [
        ({"variant": "dora"}, "unknown adapter variant 'dora'"),
        ({"rank": 0}, "rank must be a positive integer"),
        ({"band": -1}, "band must be a non-negative integer"),
        ({"targets": " "}, "targets must be"),
    ]:
        with pytest.raises(SpectralDiffusionError, match=message):
            AdapterConfig(**bad)


def test_base_fingerprint(cache: SVDCache) -> None:
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    fingerprint = base_fingerprint(unet, text_encoder)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert base_fingerprint(unet.half(), text_encoder.half()) == fingerprint
    unet.float()
    with torch.no_grad():
        unet.conv_in.weight.add_(1.0)  # not an adaptable layer: ignored
    assert base_fingerprint(unet, text_encoder) == fingerprint
    inject_adapters(unet, text_encoder, AdapterConfig(targets="attn+ff", rank=2), svd_cache=cache)
    assert base_fingerprint(unet, text_encoder) == fingerprint  # wrappers are looked through
    with torch.no_grad():
        unet.down_blocks[0].attentions[0].proj_in.weight.add_(1e-2)
    assert base_fingerprint(unet, text_encoder) != fingerprint
    assert base_fingerprint(tiny_unet(seed=1), text_encoder) != fingerprint
