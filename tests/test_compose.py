"""Live composition: equal to the fused model, cheap weight changes, exact add / remove of concepts and tokens,
concepts scoped to the regions that name them."""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import StableDiffusionPipeline

from spectral_diffusion.adapters.inject import adapter_layers
from spectral_diffusion.compose import Composer, concept_weights
from spectral_diffusion.concept_file import load_concept, save_concept
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.fusion import fuse
from spectral_diffusion.generation import make_scheduler
from spectral_diffusion.regional import Region, regional_prompting
from spectral_diffusion.testing.tiny_sd import random_concept

PROMPT = "a photo of <doga> and <catb> in the snow"


def _latents(pipe: StableDiffusionPipeline) -> torch.Tensor:
    return pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").images


@pytest.fixture
def paths(tmp_path, tiny_pipe):
    concepts = [random_concept(tiny_pipe, band=0, token="<doga>", seed=1, targets="attn+ff"),
                random_concept(tiny_pipe, variant="rotational", band=1, token="<catb>", seed=2)]
    return [save_concept(tmp_path / f"c{i}.safetensors", c) for i, c in enumerate(concepts)]


def test_concept_weights_are_checked_before_a_base_loads(tmp_path, paths) -> None:
    assert concept_weights(paths, [1, 0.5]) == {paths[0].absolute(): 1.0, paths[1].absolute(): 0.5}
    assert concept_weights(paths) == dict.fromkeys((p.absolute() for p in paths), 1.0)
    missing = tmp_path / "missing.safetensors"
    for args, message in [((paths, [1.0]), "1 weights given for 2 concepts"),
                          (([missing], [float("nan")]), "the weight of missing.safetensors must be a finite number"),
                          (([missing],), f"concept file {missing} not found")]:
        with pytest.raises(SpectralDiffusionError) as info:
            concept_weights(*args)
        assert str(info.value).startswith(message)


def test_live_composition_equals_the_fused_model(tiny_model_dir, tiny_pipe, paths) -> None:
    fused = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    fused.set_progress_bar_config(disable=True)
    fuse(paths, fused, weights=[1.0, 0.6])
    composer = Composer(tiny_pipe)
    composer.set_concepts({paths[0]: 0.3, paths[1]: 0.6})
    composer.set_concepts({paths[0]: 1.0, paths[1]: 0.6})  # a weight change on live adapters
    assert composer.concepts == {paths[0].resolve(): 1.0, paths[1].resolve(): 0.6}
    expected = _latents(fused)
    assert (_latents(tiny_pipe) - expected).abs().max() < 1e-4 * expected.abs().max()


def test_add_remove_and_clear_are_exact(tiny_pipe, paths) -> None:
    plain, vocab = _latents(tiny_pipe), len(tiny_pipe.tokenizer)
    base_rows = tiny_pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    composer = Composer(tiny_pipe)
    composer.set_concepts({paths[0]: 1.0, paths[1]: 1.0})
    both = _latents(tiny_pipe)
    composer.set_concepts({paths[1]: 1.0})
    assert "<doga>" not in tiny_pipe.tokenizer.get_vocab() and "<catb>" in tiny_pipe.tokenizer.get_vocab()
    assert len(tiny_pipe.tokenizer) == vocab + 2
    weight = tiny_pipe.text_encoder.get_input_embeddings().weight
    assert weight.shape[0] == vocab + 2 and tiny_pipe.text_encoder.config.vocab_size == vocab + 2
    assert torch.equal(weight[vocab:], load_concept(paths[1]).token_embeddings)
    assert torch.equal(weight[:vocab], base_rows)
    assert all(len(layer.adapters) <= 1 for layer in adapter_layers(tiny_pipe.unet, tiny_pipe.text_encoder).values())
    composer.set_concepts({paths[1]: 1.0, paths[0]: 1.0})
    assert torch.allclose(_latents(tiny_pipe), both, atol=1e-5)
    composer.clear()
    assert adapter_layers(tiny_pipe.unet, tiny_pipe.text_encoder) == {}
    assert len(tiny_pipe.tokenizer) == vocab
    assert torch.equal(_latents(tiny_pipe), plain)


def test_changed_file_is_reloaded(tiny_pipe, paths) -> None:
    composer = Composer(tiny_pipe)
    composer.set_concepts({paths[0]: 1.0})
    first = _latents(tiny_pipe)
    save_concept(paths[0], random_concept(tiny_pipe, band=0, token="<doga>", seed=7), overwrite=True)
    os.utime(paths[0], ns=(1, 1))  # a distinct modification time even on coarse file systems
    composer.set_concepts({paths[0]: 1.0})
    assert not torch.allclose(_latents(tiny_pipe), first, atol=1e-3)
    names = {n for layer in adapter_layers(tiny_pipe.unet, tiny_pipe.text_encoder).values() for n in layer.adapters}
    assert len(names) == 1


def test_refusals_leave_the_live_set_alone(tmp_path, tiny_pipe, paths) -> None:
    composer = Composer(tiny_pipe)
    composer.set_concepts({paths[0]: 1.0})
    before = _latents(tiny_pipe)
    clash = save_concept(tmp_path / "clash.safetensors", random_concept(tiny_pipe, band=0, token="<owlc>", seed=3))
    with pytest.raises(SpectralDiffusionError, match="share singular-vector columns"):
        composer.set_concepts({paths[0]: 1.0, clash: 1.0})
    other = random_concept(tiny_pipe, band=2, token="<owlD>", seed=3)
    other.meta.base_fingerprint = "ffffffffffffffff"
    foreign = save_concept(tmp_path / "foreign.safetensors", other)
    with pytest.raises(SpectralDiffusionError, match="trained on base model ffffffffffffffff"):
        composer.set_concepts({foreign: 1.0})
    with pytest.raises(SpectralDiffusionError, match="not found"):
        composer.set_concepts({tmp_path / "missing.safetensors": 1.0})
    assert composer.concepts == {paths[0].resolve(): 1.0}
    assert torch.equal(_latents(tiny_pipe), before)


def test_scope_applies_only_the_concepts_a_prompt_names(tiny_pipe, paths) -> None:
    composer = Composer(tiny_pipe)
    composer.set_concepts({paths[0]: 1.0, paths[1]: 0.5})

    def latents() -> torch.Tensor:  # a prompt without concept tokens: only the adapters differ
        return tiny_pipe("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                         output_type="latent").images

    both = latents()
    with composer.scope("a <catb> cat on the beach"):
        scoped = latents()
    assert torch.equal(latents(), both)  # the weights come back after the block
    composer.set_concepts({paths[1]: 0.5})
    assert (scoped - latents()).abs().max() < 1e-5 * scoped.abs().max()  # live path vs merged weight: rounding
    assert (scoped - both).abs().max() > 1e-3


def test_latent_regions_apply_each_live_concept_only_in_its_own_region(tiny_pipe, paths) -> None:
    # Left | right at twice the native width with DDIM and shared noise: with `scope`, each half is the native image
    # of its prompt with only its own concept live; without it, the other concept's adapter changes the half too.
    tiny_pipe.scheduler = make_scheduler("ddim", tiny_pipe.scheduler.config)
    composer = Composer(tiny_pipe)
    composer.set_concepts({paths[0]: 1.0, paths[1]: 1.0})
    noise = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(3))
    regions = [Region("a <doga> dog", (0.0, 0.0, 0.5, 1.0)), Region("a <catb> cat", (0.5, 0.0, 1.0, 1.0))]

    def run(prompt, latents, regions=(), scope=None) -> torch.Tensor:
        width = latents.shape[-1] * tiny_pipe.vae_scale_factor
        with regional_prompting(tiny_pipe, regions, height=16, width=width, mode="latent", scope=scope):
            return tiny_pipe(prompt, height=16, width=width, num_inference_steps=2, latents=latents,
                             output_type="latent").images

    wide = run("a dog and a cat", noise.clone(), regions, composer.scope)
    unscoped = run("a dog and a cat", noise.clone(), regions)
    with composer.scope("a <doga> dog"):
        left = run("a <doga> dog", noise[..., :8].clone())
    with composer.scope("a <catb> cat"):
        right = run("a <catb> cat", noise[..., 8:].clone())
    assert torch.allclose(wide[..., :8], left, rtol=0, atol=1e-5)
    assert torch.allclose(wide[..., 8:], right, rtol=0, atol=1e-5)
    assert (unscoped[..., :8] - left).abs().max() > 1e-3
    assert all(layer.scales[name] == 1.0 for layer in adapter_layers(tiny_pipe.unet, tiny_pipe.text_encoder).values()
               for name in layer.scales)


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -float("inf"), 1e300, "heavy"])
def test_non_finite_or_absurd_weights_are_refused_before_anything_changes(tiny_pipe, paths, weight) -> None:
    composer = Composer(tiny_pipe)
    composer.set_concepts({paths[0]: 1.0})
    with pytest.raises(SpectralDiffusionError, match=f"the weight of {paths[1].name} must be a"):
        composer.set_concepts({paths[0]: 0.5, paths[1]: weight})
    assert composer.concepts == {paths[0].resolve(): 1.0}


def test_the_same_live_set_gives_bit_identical_images_whatever_came_before(tiny_pipe, paths) -> None:
    """Reproducible from the PNG metadata: the live state is rebuilt in one order, not patched by history."""
    composer = Composer(tiny_pipe)
    composer.set_concepts({paths[0]: 1.0, paths[1]: 0.5})
    first = _latents(tiny_pipe)
    composer.set_concepts({paths[1]: 0.5})
    composer.set_concepts({paths[1]: 0.5, paths[0]: 1.0})
    assert torch.equal(_latents(tiny_pipe), first)
