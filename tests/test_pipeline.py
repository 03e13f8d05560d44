"""The pipeline verbs (load / set weights / fuse / unfuse / unload concepts) against `fusion.fuse` and the plain base,
beside diffusers' own LoRA calls in either order, and `<concept:NAME:W>` in prompts (CLI and app)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from spectral_diffusion import (
    fuse_concepts,
    get_concept_weights,
    load_concept_weights,
    set_concept_weights,
    unfuse_concepts,
    unload_concept_weights,
)
from spectral_diffusion.adapters import adapter_layers
from spectral_diffusion.cli import main
from spectral_diffusion.concept_file import save_concept
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.export import export_lora
from spectral_diffusion.fusion import fuse
from spectral_diffusion.generation import GenerationSettings, generate
from spectral_diffusion.loras import set_loras
from spectral_diffusion.pipeline import prompt_tags
from spectral_diffusion.testing.tiny_sd import random_concept

SETTINGS = GenerationSettings("a photo of <dogA> dog and <catB> cat", steps=2, seed=3)


@pytest.fixture
def concepts(tmp_path: Path, tiny_pipe: StableDiffusionPipeline) -> Path:
    """`concepts/` with dogA (band 0) and catB (band 1, rotational), and `loras/style.safetensors` (band 2)."""
    folder = tmp_path / "concepts"
    folder.mkdir()
    save_concept(folder / "dogA.safetensors", random_concept(tiny_pipe, token="<dogA>", seed=1))
    save_concept(folder / "catB.safetensors",
                 random_concept(tiny_pipe, variant="rotational", band=1, token="<catB>", seed=2))
    (tmp_path / "loras").mkdir()
    style = save_concept(tmp_path / "style.safetensors",
                         random_concept(tiny_pipe, token="<sty>", band=2, targets="attn+ff", seed=3))
    export_lora(style, tmp_path / "loras" / "style.safetensors", "kohya")
    return folder


def _fresh(tiny_model_dir: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _weights(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().clone() for name in ("unet", "text_encoder")
            for k, v in getattr(pipe, name).state_dict().items()}


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _latents(pipe: StableDiffusionPipeline) -> np.ndarray:
    return pipe(SETTINGS.prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="latent").images.numpy()


def test_generate_returns_pil_images_that_carry_their_metadata(tiny_pipe, tmp_path) -> None:
    from spectral_diffusion.generation import save_images

    images = generate(tiny_pipe, replace(SETTINGS, prompt="a dog", n=2))
    assert all(isinstance(image, Image.Image) for image in images)
    assert images[0].size == (16, 16) and [image.info["seed"] for image in images] == [3, 4]
    assert images[1].info["parameters"].startswith("a dog\nSteps: 2, Sampler: DPM++ 2M, CFG scale: 7, Seed: 4,")
    [path] = save_images(images[1:], tmp_path)
    with Image.open(path) as png:
        assert png.text["parameters"] == images[1].info["parameters"]


def test_load_set_fuse_unfuse_unload_round_trip(concepts, tiny_pipe, tiny_model_dir) -> None:
    plain, vocab = _weights(tiny_pipe), len(tiny_pipe.tokenizer)
    assert load_concept_weights(tiny_pipe, "dogA", concepts_dir=concepts) == "dogA"  # by name in a folder
    assert load_concept_weights(tiny_pipe, concepts / "catB.safetensors", 0.5) == "catB"  # by path
    set_concept_weights(tiny_pipe, {"dogA": 0.8})
    loaded = get_concept_weights(tiny_pipe)
    assert list(loaded.items()) == [("catB", 0.5), ("dogA", 0.8)]  # one order, by path, whatever the calls
    live = _latents(tiny_pipe)

    report = fuse_concepts(tiny_pipe)  # exactly what fusion.fuse(..., "spectral") writes into a fresh base
    reference = _fresh(tiny_model_dir)
    expected = fuse([concepts / f"{name}.safetensors" for name in loaded], reference, "spectral", list(loaded.values()))
    assert not adapter_layers(tiny_pipe.unet, tiny_pipe.text_encoder)
    assert _same_weights(_weights(tiny_pipe), _weights(reference))
    assert tiny_pipe.tokenizer.get_vocab() == reference.tokenizer.get_vocab()
    assert report.weights == expected.weights == [0.5, 0.8] and report.method == "spectral"
    assert np.abs(_latents(tiny_pipe) - live).max() < 1e-4  # the live sum, to float rounding
    assert get_concept_weights(tiny_pipe) == loaded
    with pytest.raises(SpectralDiffusionError, match=r"cannot set concept weights while the concepts are fused; "
                                                     r"call unfuse_concepts\(pipe\) first"):
        set_concept_weights(tiny_pipe, {"dogA": 1.0})
    with pytest.raises(SpectralDiffusionError, match="already fused"):
        fuse_concepts(tiny_pipe)

    unfuse_concepts(tiny_pipe)  # the weights from before, bit for bit, and the same concepts live again
    assert np.array_equal(_latents(tiny_pipe), live)
    unload_concept_weights(tiny_pipe, "catB")
    assert get_concept_weights(tiny_pipe) == {"dogA": 0.8}
    unload_concept_weights(tiny_pipe)
    assert get_concept_weights(tiny_pipe) == {} and not adapter_layers(tiny_pipe.unet, tiny_pipe.text_encoder)
    assert _same_weights(_weights(tiny_pipe), plain) and len(tiny_pipe.tokenizer) == vocab  # the plain base

    with pytest.raises(SpectralDiffusionError, match=r"no concept file nope \(nor nope.safetensors in "):
        load_concept_weights(tiny_pipe, "nope", concepts_dir=concepts)
    with pytest.raises(SpectralDiffusionError, match=r"concept dogA is not loaded \(loaded: none\)"):
        set_concept_weights(tiny_pipe, {"dogA": 1.0})
    with pytest.raises(SpectralDiffusionError, match="no concepts are loaded"):
        fuse_concepts(tiny_pipe)
    with pytest.raises(SpectralDiffusionError, match="no concepts are fused"):
        unfuse_concepts(tiny_pipe)


def test_fuse_and_unfuse_keep_loras_fused_by_set_loras(concepts, tiny_pipe, tiny_model_dir) -> None:
    lora = concepts.parent / "loras" / "style.safetensors"
    set_loras(tiny_pipe, {lora: 0.7})
    load_concept_weights(tiny_pipe, "dogA", concepts_dir=concepts)
    live = _latents(tiny_pipe)
    fuse_concepts(tiny_pipe)
    assert np.abs(_latents(tiny_pipe) - live).max() < 1e-4
    unfuse_concepts(tiny_pipe)
    assert np.array_equal(_latents(tiny_pipe), live)
    unload_concept_weights(tiny_pipe)
    set_loras(tiny_pipe, {})
    assert _same_weights(_weights(tiny_pipe), _weights(_fresh(tiny_model_dir)))


def test_concepts_beside_diffusers_loras_in_either_order(concepts, tiny_model_dir) -> None:
    lora = str(concepts.parent / "loras" / "style.safetensors")
    lora_first = _fresh(tiny_model_dir)
    lora_first.load_lora_weights(lora, adapter_name="style")
    lora_first.set_adapters(["style"], adapter_weights=[0.7])
    lora_only = _latents(lora_first)
    load_concept_weights(lora_first, "dogA", concepts_dir=concepts)  # checked against the base under the LoRA

    concept_first = _fresh(tiny_model_dir)
    load_concept_weights(concept_first, "dogA", concepts_dir=concepts)
    concept_only = _latents(concept_first)
    concept_first.load_lora_weights(lora, adapter_name="style")  # PEFT wraps the concept's layers
    concept_first.set_adapters(["style"], adapter_weights=[0.7])

    both = _latents(concept_first)
    assert np.array_equal(_latents(lora_first), both)
    assert min(np.abs(both - lora_only).max(), np.abs(both - concept_only).max()) > 1e-3
    assert concept_first.get_active_adapters() == ["style"]

    fuse_concepts(concept_first)  # under PEFT's layers: the LoRA stays live on top
    assert np.abs(_latents(concept_first) - both).max() < 1e-4
    unfuse_concepts(concept_first)
    assert np.array_equal(_latents(concept_first), both)
    concept_first.fuse_lora()  # written into the weights under the live concept: the merged weight follows
    assert np.abs(_latents(concept_first) - both).max() < 1e-4
    concept_first.unfuse_lora()
    concept_first.unload_lora_weights()
    assert np.abs(_latents(concept_first) - concept_only).max() < 1e-4
    set_concept_weights(concept_first, {"dogA": 0.0})
    assert np.abs(_latents(concept_first) - _latents(_fresh(tiny_model_dir))).max() < 1e-4


def test_concept_tag_is_the_concepts_flag(concepts, tmp_path, tiny_model_dir, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # concepts/ is the default --concepts-dir
    common = ["generate", "--base", str(tiny_model_dir), "--device", "cpu", "--steps", "2", "--seed", "3"]
    assert main([*common, "--prompt", "a photo of <concept:dogA:0.7> <dogA> dog", "--out", "tag"]) == 0
    assert main([*common, "--prompt", "a photo of <dogA> dog", "--concepts", "concepts/dogA.safetensors",
                 "--weights", "0.7", "--out", "flag"]) == 0
    assert main([*common, "--prompt", "a photo of <dogA> dog", "--out", "none"]) == 0
    [tag], [flag], [none] = (list(Path(d).glob("*.png")) for d in ("tag", "flag", "none"))
    with Image.open(tag) as a, Image.open(flag) as b, Image.open(none) as c:
        assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))
        assert a.text["parameters"] == b.text["parameters"]
        assert a.text["parameters"].startswith("a photo of <doga> dog\n")
        assert 'Concepts: "dogA.safetensors: 0.7"' in a.text["parameters"]
    capsys.readouterr()
    for args, message in [
        (["--prompt", "<concept:dogA> dog", "--concepts", "concepts/dogA.safetensors"],
         "concept dogA.safetensors is given twice"),
        (["--prompt", "<concept:dogA> dog", "--model", str(tiny_model_dir)], "use --base, not --model"),
        (["--prompt", "<concept:nope:1> dog"], "<concept:nope:1>: no concept nope.safetensors in concepts"),
        (["--prompt", "<concept:dogA:inf> dog"], "the weight of dogA.safetensors must be a finite number"),
    ]:
        assert main(["generate", *args, "--base", str(tmp_path / "no-such-model"), "--out", "err"]) == 2
        assert message in capsys.readouterr().err, message
    tags = prompt_tags("<lora:style:0.5> a <concept:catB> cat, <concept:dogA:2>", lora_dir="loras")
    assert tags == ("a cat", {(tmp_path / "loras" / "style.safetensors").resolve(): 0.5},
                    {concepts / "catB.safetensors": 1.0, concepts / "dogA.safetensors": 2.0})


def test_app_resolves_concept_tags_in_its_concepts_folder(concepts, tmp_path, tiny_model_dir) -> None:
    from spectral_diffusion.models import BaseSpec
    from spectral_diffusion.ui.backend import Backend

    backend = Backend(BaseSpec(str(tiny_model_dir)).load(), concepts_dir=concepts, output_dir=tmp_path / "out")
    settings = replace(SETTINGS, prompt="a photo of <dogA> dog")
    [(_, tagged)] = backend.generate(replace(settings, prompt="a photo of <concept:dogA:0.7> <dogA> dog"), {})
    [(_, picked)] = backend.generate(settings, {"dogA": 0.7})
    assert np.array_equal(np.asarray(tagged), np.asarray(picked))
    assert tagged.info["parameters"] == picked.info["parameters"]
    assert 'Concepts: "dogA: 0.7"' in tagged.info["parameters"]
    with pytest.raises(SpectralDiffusionError, match="concept dogA.safetensors is given twice"):
        backend.generate(replace(settings, prompt="<concept:dogA> dog"), {"dogA": 1.0})
