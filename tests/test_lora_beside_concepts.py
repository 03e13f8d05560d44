"""Ordinary LoRAs beside live concepts: Python in either order, `generate --lora`, `<lora:name:w>`, PNG metadata.

diffusers' own LoRA calls beside the concept verbs: tests/test_pipeline.py."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spectral_diffusion.cli import main
from spectral_diffusion.compose import Composer
from spectral_diffusion.concept_file import save_concept
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.export import export_lora
from spectral_diffusion.generation import GenerationSettings, generate
from spectral_diffusion.loras import fused_loras, parse_lora_arg, set_loras
from spectral_diffusion.pipeline import prompt_tags
from spectral_diffusion.testing.tiny_sd import random_concept

SETTINGS = GenerationSettings("a photo of <dogA> dog", steps=2, seed=3)


@pytest.fixture
def files(tmp_path, tiny_pipe) -> tuple[Path, Path]:
    """A concept file (band 0) and a kohya LoRA exported from another concept (band 1, attn+ff)."""
    concept = save_concept(tmp_path / "dogA.safetensors", random_concept(tiny_pipe, token="<dogA>", seed=1))
    other = save_concept(tmp_path / "other.safetensors",
                         random_concept(tiny_pipe, token="<sty>", band=1, targets="attn+ff", seed=2))
    (tmp_path / "loras").mkdir()
    lora = tmp_path / "loras" / "style.safetensors"
    export_lora(other, lora, "kohya")
    return Path(concept), lora


def _image(pipe) -> np.ndarray:
    return np.asarray(generate(pipe, SETTINGS)[0], dtype=np.int16)


def test_concept_and_lora_together_in_either_order(files, tiny_pipe, tiny_model_dir) -> None:
    from diffusers import StableDiffusionPipeline

    concept, lora = files
    plain = _image(tiny_pipe)
    composer = Composer(tiny_pipe)
    composer.set_concepts({concept: 1.0})
    concept_only = _image(tiny_pipe)  # builds the merged live weights before the LoRA arrives
    set_loras(tiny_pipe, {lora: 0.8})
    concepts_first = _image(tiny_pipe)
    assert fused_loras(tiny_pipe) == {lora.resolve(): 0.8}

    other = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    other.set_progress_bar_config(disable=True)
    set_loras(other, {lora: 0.8})
    lora_only = _image(other)
    Composer(other).set_concepts({concept: 1.0})  # checked against the base as loaded, not the fused one
    lora_first = _image(other)

    assert np.array_equal(concepts_first, lora_first)
    for alone in (plain, concept_only, lora_only):
        assert np.abs(concepts_first - alone).max() > 1
    set_loras(tiny_pipe, {lora: 0.3})
    set_loras(tiny_pipe, {})  # back to the untouched base weights, concept still live
    assert np.array_equal(_image(tiny_pipe), concept_only)
    composer.clear()
    assert np.array_equal(_image(tiny_pipe), plain)


def test_set_loras_refuses_to_drop_adapters_loaded_elsewhere(files, tiny_pipe) -> None:
    """diffusers unloads every LoRA layer at once, so set_loras would lose a user's unfused adapter: refused."""
    _, lora = files
    tiny_pipe.load_lora_weights(str(lora), adapter_name="mine")
    before = _image(tiny_pipe)
    with pytest.raises(SpectralDiffusionError, match=r"^the pipeline holds LoRA adapters loaded outside set_loras "
                                                     r"\(mine\), which fusing would unload; "):
        set_loras(tiny_pipe, {lora: 0.5})
    assert tiny_pipe.get_list_adapters() == {"unet": ["mine"], "text_encoder": ["mine"]}
    assert np.array_equal(_image(tiny_pipe), before) and fused_loras(tiny_pipe) == {}


def test_lora_arguments_and_prompt_tags(files, tmp_path) -> None:
    _, lora = files
    assert parse_lora_arg(f"{lora}:0.5") == (lora.resolve(), 0.5)
    assert parse_lora_arg(str(lora)) == (lora.resolve(), 1.0)
    assert prompt_tags("a dog, <lora:style:0.7> in snow", lora_dir=tmp_path / "loras") == (
        "a dog, in snow", {lora.resolve(): 0.7}, {})
    assert prompt_tags("a  dog", lora_dir=tmp_path / "loras") == ("a  dog", {}, {})
    with pytest.raises(SpectralDiffusionError, match="no LoRA missing.safetensors in"):
        prompt_tags("<lora:missing:1>", lora_dir=tmp_path / "loras")
    with pytest.raises(SpectralDiffusionError, match="LoRA name '../style' leads outside"):
        prompt_tags("<lora:../style:1>", lora_dir=tmp_path / "loras")
    with pytest.raises(SpectralDiffusionError, match="cannot read the weight 'x' in '<lora:style:x>'"):
        prompt_tags("<lora:style:x>", lora_dir=tmp_path / "loras")
    with pytest.raises(SpectralDiffusionError, match="LoRA file nope.safetensors does not exist"):
        parse_lora_arg("nope.safetensors:1")
    with pytest.raises(SpectralDiffusionError, match="the weight of LoRA style.safetensors"):
        parse_lora_arg(f"{lora}:inf")
    with pytest.raises(SpectralDiffusionError, match="holds no LoRA tensors"):
        parse_lora_arg(str(files[0]))


def test_cli_lora_flag_and_prompt_tag_give_the_same_image_and_metadata_reproduces_it(
        files, tmp_path, tiny_model_dir, capsys) -> None:
    concept, lora = files
    common = ["--base", str(tiny_model_dir), "--device", "cpu", "--steps", "2", "--seed", "3",
              "--concepts", str(concept)]
    assert main(["generate", *common, "--prompt", "a photo of <dogA> dog", "--lora", f"{lora}:0.8",
                 "--out", str(tmp_path / "flag")]) == 0
    assert main(["generate", *common, "--prompt", "a photo of <lora:style:0.8> <dogA> dog",
                 "--lora-dir", str(tmp_path / "loras"), "--out", str(tmp_path / "tag")]) == 0
    assert main(["generate", *common, "--prompt", "a photo of <dogA> dog", "--out", str(tmp_path / "none")]) == 0
    [flag], [tag], [none] = (list((tmp_path / d).glob("*.png")) for d in ("flag", "tag", "none"))
    with Image.open(flag) as a, Image.open(tag) as b, Image.open(none) as c:
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert not np.array_equal(np.asarray(a), np.asarray(c))
        parameters = a.text["parameters"]
        assert parameters == b.text["parameters"]
        pixels = np.asarray(a)
    assert parameters.startswith("a photo of <doga> dog\n")
    assert 'Concepts: "dogA.safetensors: 1", Loras: "style.safetensors: 0.8"' in parameters
    capsys.readouterr()

    # Remake the image from its metadata alone: the prompt, seed, concepts and LoRAs it records.
    prompt, fields = parameters.split("\n")
    name, weight = re.search(r'Loras: "(.+?): (.+?)"', fields).groups()
    seed = re.search(r"Seed: (\d+)", fields)[1]
    assert main(["generate", "--base", str(tiny_model_dir), "--device", "cpu", "--steps", "2", "--seed", seed,
                 "--concepts", str(concept), "--prompt", prompt, "--lora", f"{lora.parent / name}:{weight}",
                 "--out", str(tmp_path / "again")]) == 0
    [again] = (tmp_path / "again").glob("*.png")
    with Image.open(again) as d:
        assert np.array_equal(np.asarray(d), pixels)


def test_cli_lora_errors_come_before_the_base_loads(files, tmp_path, capsys) -> None:
    _, lora = files
    base = ["generate", "--prompt", "a dog", "--base", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "o")]
    assert main([*base, "--lora", "missing.safetensors"]) == 2
    assert capsys.readouterr().err.strip().endswith("LoRA file missing.safetensors does not exist")
    assert main([*base, "--lora", f"{lora}:nan"]) == 2
    assert "the weight of LoRA style.safetensors" in capsys.readouterr().err
    assert main([*base, "--lora", str(lora), "--prompt", "a <lora:style> dog", "--lora-dir", str(lora.parent)]) == 2
    assert "LoRA style.safetensors is given twice" in capsys.readouterr().err


def test_app_backend_resolves_prompt_loras_in_its_loras_folder(files, tmp_path, tiny_model_dir) -> None:
    from spectral_diffusion.models import BaseSpec
    from spectral_diffusion.ui.backend import Backend

    concept, lora = files
    backend = Backend(BaseSpec(str(tiny_model_dir)).load(), concepts_dir=concept.parent, output_dir=tmp_path / "out")
    (tmp_path / "out" / "loras").mkdir()
    lora.rename(tmp_path / "out" / "loras" / lora.name)
    [(_, tagged)] = backend.generate(replace(SETTINGS, prompt="a photo of <lora:style:0.8> <dogA> dog"),
                                     {"dogA": 1.0})
    [(_, plain)] = backend.generate(SETTINGS, {"dogA": 1.0})
    assert tagged.info["parameters"].startswith("a photo of <doga> dog\n")
    assert 'Loras: "style.safetensors: 0.8"' in tagged.info["parameters"] and "Loras" not in plain.info["parameters"]
    assert not np.array_equal(np.asarray(tagged), np.asarray(plain))
