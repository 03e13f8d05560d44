"""Live composition with merged weights (`Composer(merge=True)`, the default): equal to the live path, the base
weights never written, the plain model back bit for bit."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline

from spectral_diffusion.adapters.inject import adapter_layers
from spectral_diffusion.adapters.layers import unwrap
from spectral_diffusion.adapters.targets import find_targets
from spectral_diffusion.compose import Composer
from spectral_diffusion.concept_file import save_concept
from spectral_diffusion.testing.tiny_sd import random_concept


def _latents(pipe: StableDiffusionPipeline, prompt: str = "a photo of a dog and a cat") -> torch.Tensor:
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").images


def test_merged_live_set_equals_the_live_path_and_restores_exactly(tmp_path, tiny_pipe) -> None:
    concepts = [random_concept(tiny_pipe, band=i, token=f"<c{i}>", seed=i, targets="attn+ff" if i % 2 else "attn")
                for i in range(4)]
    paths = [save_concept(tmp_path / f"c{i}.safetensors", c) for i, c in enumerate(concepts)]
    weights = {p: 0.5 + 0.25 * i for i, p in enumerate(paths)}
    targets = find_targets(tiny_pipe.unet, tiny_pipe.text_encoder, "attn+ff")
    originals = {name: module.weight.detach().clone() for name, module in targets.items()}
    plain = _latents(tiny_pipe)

    merged = Composer(tiny_pipe)
    merged.set_concepts(weights)
    assert all(layer.merge_live for layer in adapter_layers(tiny_pipe.unet, tiny_pipe.text_encoder).values())
    fast = _latents(tiny_pipe)
    for name, module in find_targets(tiny_pipe.unet, tiny_pipe.text_encoder, "attn+ff").items():
        assert torch.equal(unwrap(module).weight, originals[name])
    merged.clear()
    assert torch.equal(_latents(tiny_pipe), plain)

    live = Composer(tiny_pipe, merge=False)
    live.set_concepts(weights)
    slow = _latents(tiny_pipe)
    assert (fast - slow).abs().max() < 1e-5 * slow.abs().max()
    assert (fast - plain).abs().max() > 1e-3
    live.clear()
    assert torch.equal(_latents(tiny_pipe), plain)


def test_scope_keeps_the_merged_weights_for_after_the_block(tmp_path, tiny_pipe) -> None:
    paths = [save_concept(tmp_path / f"c{i}.safetensors", random_concept(tiny_pipe, band=i, token=f"<c{i}>", seed=i))
             for i in range(2)]
    composer = Composer(tiny_pipe)
    composer.set_concepts({paths[0]: 1.0, paths[1]: 0.5})
    before = _latents(tiny_pipe)
    layers = adapter_layers(tiny_pipe.unet, tiny_pipe.text_encoder).values()
    dense = [layer.live_weight() for layer in layers]
    with composer.scope("a <c1> cat"):
        assert not any(layer.merge_live for layer in layers)
        _latents(tiny_pipe)
    assert all(layer.merge_live for layer in layers)
    assert all(layer.live_weight() is weight for layer, weight in zip(layers, dense, strict=True))  # not rebuilt
    assert torch.equal(_latents(tiny_pipe), before)
