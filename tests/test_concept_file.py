"""Concept files: exact round trip, atomic no-clobber writes, and one clear error per kind of broken file."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from spectral_diffusion.adapters.layers import delta_factors
from spectral_diffusion.concept_file import (
    FORMAT_VERSION,
    METADATA_KEY,
    Concept,
    load_concept,
    read_meta,
    save_concept,
)
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.testing.tiny_sd import random_concept


@pytest.fixture
def concept(tiny_pipe) -> Concept:
    return random_concept(tiny_pipe, variant="additive", rank=4, band=2, token="<doga>", n_vectors=3)


@pytest.mark.parametrize("variant", ["additive", "rotational", "lora", "ortho"])
def test_round_trip_is_exact(tmp_path, tiny_pipe, variant):
    concept = random_concept(tiny_pipe, variant=variant, targets="attn+ff", token="<catb>", seed=1)
    path = save_concept(tmp_path / "c.safetensors", concept)
    loaded = load_concept(path)
    assert loaded.meta == concept.meta
    assert loaded.layers.keys() == concept.layers.keys()
    for layer, state in concept.layers.items():
        assert loaded.layers[layer].keys() == state.keys()
        for key, tensor in state.items():
            assert torch.equal(loaded.layers[layer][key], tensor), (layer, key)
        up, down = loaded.delta_factors(layer)
        expected_up, expected_down = delta_factors(variant, state)
        assert torch.equal(up @ down, expected_up @ expected_down)
    assert torch.equal(loaded.token_embeddings, concept.token_embeddings)
    assert read_meta(path) == concept.meta
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp file left behind


def test_file_layout(tmp_path, concept):
    path = save_concept(tmp_path / "c.safetensors", concept)
    tensors = load_file(path)
    layer = next(iter(concept.layers))
    assert set(tensors) == {f"{n}::{k}" for n, s in concept.layers.items() for k in s} | {"token_embeddings"}
    assert tensors[f"{layer}::U"].dtype == torch.float32
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()[METADATA_KEY])
    assert header["format_version"] == FORMAT_VERSION
    assert header["layers"] == sorted(concept.layers)
    assert header["token_names"] == ["<doga>", "<doga>_1", "<doga>_2"]
    assert header["band"] == 2 and header["variant"] == "additive" and header["created"].endswith("+00:00")


def test_size_of_a_tiny_attn_concept(tmp_path, concept):
    """64 attention layers, rank 4, additive: (2 (out + in) + 2) * r fp32 values per layer, plus the header."""
    path = save_concept(tmp_path / "c.safetensors", concept)
    tensors = [t for s in concept.layers.values() for t in s.values()] + [concept.token_embeddings]
    values = sum(t.numel() for t in tensors)
    assert len(concept.layers) == 64 and values == 47_712
    assert values * 4 < path.stat().st_size < values * 4 + 200 * len(tensors) + 4096  # tensors + JSON header


def test_refuses_to_overwrite_unless_asked(tmp_path, tiny_pipe, concept):
    path = save_concept(tmp_path / "c.safetensors", concept)
    other = random_concept(tiny_pipe, token="<other>", seed=5)
    with pytest.raises(SpectralDiffusionError, match="already exists"):
        save_concept(path, other)
    assert load_concept(path).meta.token == "<doga>"
    save_concept(path, other, overwrite=True)
    assert load_concept(path).meta.token == "<other>"


def _rewrite(path, tensors=None, header=None, drop_header=False):
    """Rewrite a saved concept with edited tensors / metadata."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    data = json.loads(meta[METADATA_KEY])
    if header:
        data.update(header)
    meta[METADATA_KEY] = json.dumps(data)
    if drop_header:
        del meta[METADATA_KEY]
    save_file(tensors if tensors is not None else load_file(path), path, metadata=meta)


def _first_layer(path):
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()[METADATA_KEY])["layers"][0]


def _edit_missing_tensor(path):
    tensors = load_file(path)
    del tensors[f"{_first_layer(path)}::A"]
    _rewrite(path, tensors)


def _edit_shape(path):
    tensors = load_file(path)
    key = f"{_first_layer(path)}::U"
    tensors[key] = tensors[key][:, :3].contiguous()  # rank 3 U in a rank-4 layer
    _rewrite(path, tensors)


def _edit_stray_tensor(path):
    tensors = load_file(path)
    tensors["unet.not_listed::A"] = torch.zeros(2, 2)
    _rewrite(path, tensors)


def _edit_nan(path):
    tensors = load_file(path)
    tensors["token_embeddings"][0, 0] = float("nan")
    _rewrite(path, tensors)


def _edit_token_rows(path):
    tensors = load_file(path)
    tensors["token_embeddings"] = tensors["token_embeddings"][:2].contiguous()
    _rewrite(path, tensors)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p.unlink(), "not found"),
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated|not a readable"),
        (lambda p: p.write_text("hello"), "not a readable .safetensors"),
        (lambda p: _rewrite(p, drop_header=True), "no spectral-diffusion metadata"),
        (lambda p: _rewrite(p, header={"format_version": FORMAT_VERSION + 1}), "newer than this"),
        (lambda p: _rewrite(p, header={"variant": "magic"}), "unknown adapter variant 'magic'"),
        (lambda p: _rewrite(p, header={"rank": 8}), "has rank 4, metadata says 8"),
        (lambda p: _rewrite(p, header={"band": None}), "needs a band"),
        (lambda p: _rewrite(p, header={"token": None}), "lacks token|token must be a string"),
        (_edit_missing_tensor, r"missing tensors \['A'\]"),
        (_edit_shape, "has shape .* inconsistent with"),
        (_edit_stray_tensor, "belongs to no layer"),
        (_edit_nan, "finite"),
        (_edit_token_rows, r"token_embeddings has shape \(2, 32\)"),
        (lambda p: _rewrite(p, header={"kernels": {_first_layer(p): [5, 5]}}), "invalid conv kernel \\[5, 5\\]"),
        (lambda p: _rewrite(p, header={"kernels": {"unet.nowhere": [1, 1]}}), "invalid conv kernel .* unet.nowhere"),
        (lambda p: _rewrite(p, header={"kernels": [3, 3]}), "kernels must map layer names"),
    ],
)
def test_broken_files_give_one_clear_error_naming_the_file(tmp_path, concept, edit, message):
    path = save_concept(tmp_path / "broken.safetensors", concept)
    edit(path)
    with pytest.raises(SpectralDiffusionError, match=message) as info:
        load_concept(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_metadata_field_is_named(tmp_path, concept):
    path = save_concept(tmp_path / "c.safetensors", concept)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    data = json.loads(meta[METADATA_KEY])
    del data["base_fingerprint"]
    meta[METADATA_KEY] = json.dumps(data)
    save_file(load_file(path), path, metadata=meta)
    with pytest.raises(SpectralDiffusionError, match="lacks base_fingerprint"):
        read_meta(path)


def test_save_validates_before_writing(tmp_path, concept):
    first = next(iter(concept.layers))
    concept.layers[first]["S"] = concept.layers[first]["S"][:2]
    with pytest.raises(SpectralDiffusionError, match=first):
        save_concept(tmp_path / "c.safetensors", concept)
    assert not any(tmp_path.iterdir())
