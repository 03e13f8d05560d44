"""One trigger word per concept: stored lower-case at training, case-insensitive in this project's prompts, and the
same word works verbatim in plain diffusers (`load_textual_inversion(file)` with no token) and names the embedding
file for A1111 / ComfyUI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from spectral_diffusion.cli import main
from spectral_diffusion.compose import Composer
from spectral_diffusion.concept_file import METADATA_KEY, load_concept, save_concept
from spectral_diffusion.generation import GenerationSettings, generate, make_scheduler
from spectral_diffusion.testing.tiny_sd import random_concept

PHOTOS = Path(__file__).parent / "data" / "photos"
SETTINGS = {"steps": 4, "seed": 5, "guidance": 7.0, "scheduler": "ddim"}


def _ours(tiny_model_dir: Path, concept: Path, prompt: str) -> np.ndarray:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    Composer(pipe).set_concepts({concept: 1.0})
    (image,) = generate(pipe, GenerationSettings(prompt=prompt, **SETTINGS))
    return np.asarray(image, dtype=np.float32)


def _diffusers(tiny_model_dir: Path, prompt: str, lora: Path | None = None, embedding: Path | None = None) -> np.ndarray:
    """Plain diffusers, as its documentation says to load a LoRA and a textual inversion."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    if embedding is not None:
        pipe.load_textual_inversion(str(embedding))
    pipe.scheduler = make_scheduler(SETTINGS["scheduler"], pipe.scheduler.config)
    image = pipe(prompt, num_inference_steps=SETTINGS["steps"], guidance_scale=SETTINGS["guidance"],
                 generator=torch.Generator().manual_seed(SETTINGS["seed"])).images[0]
    return np.asarray(image, dtype=np.float32)


def test_the_trained_trigger_works_verbatim_in_diffusers(tiny_model_dir: Path, tmp_path: Path, monkeypatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SPECTRAL_DIFFUSION_CACHE", str(tmp_path / "cache"))
    photos = tmp_path / "photos"
    shutil.copytree(PHOTOS, photos, ignore=shutil.ignore_patterns("*.md"))
    out = tmp_path / "dogA.safetensors"
    assert main(["train", str(photos), "--token", "<DogA>", "--class-word", "dog", "--base", str(tiny_model_dir),
                 "--steps", "3", "--batch-size", "1", "--rank", "4", "--lr-unet", "0.05", "--lr-text", "0.05",
                 "--lr-emb", "0.05", "--preview-images", "0", "--out", str(out)]) == 0
    assert "trigger word: <doga>" in capsys.readouterr().err
    assert load_concept(out).meta.token == "<doga>"
    assert json.loads(out.with_suffix(".json").read_text())["trigger_words"] == ["<doga>"]

    lora = tmp_path / "export" / "dog_lora.safetensors"
    assert main(["export-lora", str(out), "--out", str(lora)]) == 0
    embedding = lora.with_name("<doga>.safetensors")  # A1111 / ComfyUI: the file name is the trigger word
    assert f"{embedding} (trigger word: <doga>)" in capsys.readouterr().out
    assert list(load_file(embedding)) == ["<doga>"]

    ours = _ours(tiny_model_dir, out, "a photo of <doga> dog")
    assert np.array_equal(_ours(tiny_model_dir, out, "a photo of <DogA> dog"), ours)  # prompts: any case
    theirs = _diffusers(tiny_model_dir, "a photo of <doga> dog", lora, embedding)
    base = _diffusers(tiny_model_dir, "a photo of dog")
    assert np.abs(ours - base).mean() > 5  # the concept changes the image...
    assert np.abs(theirs - ours).max() <= 2  # ... and diffusers, given the trigger verbatim, changes it the same way


def test_old_mixed_case_concept_files_load_under_the_lower_case_trigger(tiny_pipe, tiny_model_dir: Path,
                                                                        tmp_path: Path) -> None:
    path = save_concept(tmp_path / "dogA.safetensors", random_concept(tiny_pipe, token="<dogA>", n_vectors=2))
    with safe_open(str(path), framework="pt") as f:  # rewrite the header as versions before the rule wrote it
        header = json.loads(f.metadata()[METADATA_KEY])
    header.update(token="<dogA>", token_names=["<dogA>", "<dogA>_1"])
    save_file(load_file(path), path, metadata={"format": "pt", METADATA_KEY: json.dumps(header)})

    concept = load_concept(path)
    assert (concept.meta.token, concept.meta.token_names) == ("<doga>", ["<doga>", "<doga>_1"])
    old_spelling = _ours(tiny_model_dir, path, "a photo of <dogA> dog")
    assert np.array_equal(old_spelling, _ours(tiny_model_dir, path, "a photo of <doga> dog"))
    assert np.abs(old_spelling - _ours(tiny_model_dir, path, "a photo of dog")).mean() > 1


def test_fused_lora_embeddings_are_named_after_the_trigger(tiny_pipe, tiny_model_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    concept = save_concept(tmp_path / "dogA.safetensors", random_concept(tiny_pipe, token="<dogA>", band=0))
    assert main(["fuse", str(concept), "--base", str(tiny_model_dir), "--format", "lora", "--method", "spectral",
                 "--out", str(tmp_path / "fused")]) == 0
    assert "trigger words: <doga>" in capsys.readouterr().out
    assert list(load_file(tmp_path / "fused" / "embeddings" / "<doga>.safetensors")) == ["<doga>"]


def test_cli_train_takes_the_bases_training_defaults_and_flags_override_them(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Settings left off the command line come from the base folder's `training_defaults.json` (the recipe it was
    tuned with), not from TrainConfig's SD 1.5 defaults; a flag given wins, whatever its value."""
    monkeypatch.setenv("SPECTRAL_DIFFUSION_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "training_defaults.json").write_text(json.dumps(
        {"rank": 2, "targets": "kv", "steps": 2, "batch_size": 1, "locality_weight": 1.0, "flip": False}))
    photos = tmp_path / "photos"
    shutil.copytree(PHOTOS, photos, ignore=shutil.ignore_patterns("*.md"))
    common = ["train", str(photos), "--base", str(base), "--preview-images", "0"]
    assert main([*common, "--token", "<a>", "--out", str(tmp_path / "a.safetensors")]) == 0
    assert ("the base model's training defaults: rank 2, targets kv, steps 2, batch_size 1, locality_weight 1.0, "
            "flip False") in capsys.readouterr().out
    settings = load_concept(tmp_path / "a.safetensors").meta.training
    assert (settings["rank"], settings["targets"], settings["steps"], settings["locality_weight"]) == (2, "kv", 2, 1.0)
    assert main([*common, "--token", "<b>", "--rank", "8", "--steps", "1", "--targets", "attn",
                 "--out", str(tmp_path / "b.safetensors")]) == 0
    assert "training defaults: batch_size 1, locality_weight 1.0, flip False\n" in capsys.readouterr().out
    settings = load_concept(tmp_path / "b.safetensors").meta.training
    assert (settings["rank"], settings["targets"], settings["steps"], settings["locality_weight"]) == (8, "attn", 1, 1.0)
    assert settings["flip"] is False
    assert main([*common, "--token", "<d>", "--flip", "--out", str(tmp_path / "d.safetensors")]) == 0
    assert "flip" not in capsys.readouterr().out.partition("training defaults:")[2].splitlines()[0]
    assert load_concept(tmp_path / "d.safetensors").meta.training["flip"] is True
    (base / "training_defaults.json").write_text(json.dumps({"steps": 2, "out": "elsewhere"}))  # a stale file
    assert main([*common, "--token", "<c>", "--out", str(tmp_path / "c.safetensors")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: the training defaults of base {str(base)!r} name unknown "
                                               "settings: out")
