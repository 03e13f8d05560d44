"""Base-model loading (folders, single files, refusals), the single-file writer and the shipped SD 1.5 configs."""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace

import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    infer_diffusers_model_type,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTokenizer

from spectral_diffusion import models
from spectral_diffusion.adapters.targets import find_targets
from spectral_diffusion.cli.options import add_config_arguments, config_from_args
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.fingerprint import base_fingerprint
from spectral_diffusion.models import SD15_CONFIG_DIR, BaseSpec, load_base
from spectral_diffusion.single_file import clip_to_ldm, unet_to_ldm, vae_to_ldm
from spectral_diffusion.testing.sd15 import sd15_pipeline
from spectral_diffusion.testing.tiny_sd import build_tiny_pipeline
from spectral_diffusion.training.config import TrainConfig

COMPONENTS = ("unet", "vae", "text_encoder")


def assert_same_weights(a, b) -> None:
    for name in COMPONENTS:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


def test_tiny_model_is_deterministic_and_every_target_fits_eight_rank4_bands():
    a, b, other = build_tiny_pipeline(0), build_tiny_pipeline(0), build_tiny_pipeline(1)
    assert_same_weights(a, b)
    assert not torch.equal(a.unet.conv_in.weight, other.unet.conv_in.weight)
    targets = find_targets(a.unet, a.text_encoder, "attn+ff")
    assert (
        len(targets) == 7 * 12 + 2 * 6
    )  # 7 transformer blocks x (8 attn + 2 ff + proj_in/out) + 2 CLIP layers
    for name, module in targets.items():
        weight = module.weight
        assert min(weight.shape[0], weight.shape[1]) >= 32, name
    assert a.safety_checker is None


def test_single_file_loads_the_same_weights_as_the_folder(tiny_model_dir, tiny_single_file):
    folder = load_base(str(tiny_model_dir))
    single = load_base(str(tiny_single_file), config=tiny_model_dir)
    assert_same_weights(folder, single)
    assert type(single.scheduler) is type(folder.scheduler)
    assert single.tokenizer("a photo of a cat").input_ids == folder.tokenizer("a photo of a cat").input_ids
    assert single.safety_checker is None and single.unet.dtype == torch.float32


def test_single_file_holds_exactly_the_ldm_keys(tiny_model_dir, tiny_single_file):
    keys = set(load_file(tiny_single_file))
    pipe = load_base(str(tiny_model_dir))
    n_params = sum(len(getattr(pipe, c).state_dict()) for c in COMPONENTS)
    assert len(keys) == n_params
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.output_blocks.1.2.conv.weight" in keys  # upsampler after the attention
    assert "first_stage_model.decoder.up.1.upsample.conv.weight" in keys  # LDM counts decoder levels upward


def test_pickled_single_file_needs_allow_pickle(tmp_path, tiny_model_dir, tiny_single_file):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(tiny_single_file)}, ckpt)
    with pytest.raises(SpectralDiffusionError, match="--allow-pickle"):
        load_base(str(ckpt), config=tiny_model_dir)
    assert_same_weights(
        load_base(str(ckpt), config=tiny_model_dir, allow_pickle=True), load_base(str(tiny_model_dir))
    )


def test_pickled_weights_inside_a_diffusers_folder_need_allow_pickle(tmp_path, tiny_model_dir):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(unet)
    torch.save(weights, unet.with_suffix(".bin"))
    unet.unlink()
    with pytest.raises(SpectralDiffusionError, match=r"diffusion_pytorch_model.bin: the unet weights are Python "
                       "pickles .*--allow-pickle") as info:
        load_base(str(folder))
    assert "\n" not in str(info.value)
    assert_same_weights(load_base(str(folder), allow_pickle=True), load_base(str(tiny_model_dir)))
    save_file(weights, unet)  # a pickle beside the .safetensors file is never read: the folder loads without the flag
    assert_same_weights(load_base(str(folder)), load_base(str(tiny_model_dir)))


def test_dtype_option_and_cli_arguments(tiny_model_dir, tiny_single_file):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, BaseSpec)
    assert config_from_args(BaseSpec, parser.parse_args([])) == BaseSpec("toy")
    args = parser.parse_args(
        ["--base", str(tiny_single_file), "--config", str(tiny_model_dir), "--dtype", "fp16"]
    )
    loaded = config_from_args(BaseSpec, args).load()
    pipe = loaded.pipe
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.float16
    assert pipe.device.type == "cpu"
    assert loaded.fingerprint == base_fingerprint(pipe.unet, pipe.text_encoder)
    assert loaded.spec == BaseSpec(str(tiny_single_file), config=str(tiny_model_dir), dtype="fp16")


def test_one_base_spec_for_training_too(tmp_path):
    config = TrainConfig(tmp_path, "<x>", tmp_path / "x.safetensors", base="./sd15")
    assert config.base == BaseSpec("./sd15")  # a spec string stands for the spec
    assert replace(config, steps=3).base == config.base
    from spectral_diffusion.toyworld.recipe import RECIPE
    recipe_config = RECIPE.train_config("bullseye", tmp_path, tmp_path / "b.safetensors", device="cpu")
    assert recipe_config.base == BaseSpec("toy", device="cpu")
    with pytest.raises(SpectralDiffusionError) as info:
        BaseSpec(dtype="fp8").load()
    assert str(info.value) == "--dtype must be one of fp32, fp16, bf16, got 'fp8'"
    with pytest.raises(SpectralDiffusionError, match=r"^--dtype must be one of fp32, fp16, bf16, got 'fp8'$"):
        TrainConfig(tmp_path, "<x>", tmp_path / "x.safetensors", base=BaseSpec(dtype="fp8")).check()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{tmp}/missing.safetensors", "not found"),
        ("./missing_folder", "not found"),
        ("{tmp}", "without model_index.json"),
        ("{tmp}/xl", "holds StableDiffusionXLPipeline, not a Stable Diffusion 1.x pipeline"),
        ("{tmp}/model.bin", "pickles"),
        ("{tmp}/notes.txt", "unsupported file type"),
        ("{tmp}/lora.safetensors", "looks like a LoRA"),
        ("{tmp}/broken.safetensors", "not a readable .safetensors"),
        ("{model}/unet/diffusion_pytorch_model.safetensors", "not an SD 1.x single-file checkpoint"),
        ("{single}", "pass --config"),  # tiny weights do not fit the shipped SD 1.5 config
        ("some-org/some-model", "'some-org/some-model' is no local file or folder, and could not be fetched"),
    ],
)
def test_refusals_are_one_clear_line(tmp_path, tiny_model_dir, tiny_single_file, spec, message):
    (tmp_path / "xl").mkdir()
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        **{c: ["x", "y"] for c in ("unet", "text_encoder_2")},
    }
    (tmp_path / "xl" / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "model.bin").write_bytes(b"\x80\x02")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    save_file({"lora_unet_down.lora_up.weight": torch.zeros(2, 2)}, tmp_path / "lora.safetensors")
    spec = spec.format(tmp=tmp_path, model=tiny_model_dir, single=tiny_single_file)
    with pytest.raises(SpectralDiffusionError, match=message) as info:
        load_base(spec)
    assert "\n" not in str(info.value)


def test_builtin_toy_base_is_the_toy_worlds_model_folder(tmp_path, monkeypatch, tiny_model_dir):
    """`models` names the toy model's folder as data (no toy-world import); it must be where the toy world keeps it."""
    from spectral_diffusion.toyworld.model import MODEL_DIR

    assert models.BUILTIN_BASES["toy"].folder == MODEL_DIR
    monkeypatch.setitem(models.BUILTIN_BASES, "toy", models.BuiltinBase(tmp_path / "none", "build it"))
    with pytest.raises(SpectralDiffusionError, match=r"bundled toy model is missing .*: build it or pass --base"):
        load_base("toy")
    monkeypatch.setitem(models.BUILTIN_BASES, "toy", models.BuiltinBase(tiny_model_dir, "build it"))
    assert_same_weights(load_base("toy"), load_base(str(tiny_model_dir)))


def test_unavailable_device_is_refused(tiny_model_dir):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(SpectralDiffusionError, match="CUDA is not available"):
        load_base(str(tiny_model_dir), device="cuda")


def test_shipped_sd15_configs_match_sd15_and_round_trip_through_diffusers_converters():
    """Build SD 1.5 on the meta device from the shipped configs: parameter counts are SD 1.5's, and the LDM
    names this package writes are exactly what diffusers' single-file converters read back."""
    pipe = sd15_pipeline(device="meta")
    unet, vae, clip = pipe.unet, pipe.vae, pipe.text_encoder
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, clip)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]
    ldm = {**unet_to_ldm(unet), **vae_to_ldm(vae), **clip_to_ldm(clip)}
    assert infer_diffusers_model_type(ldm) == "v1"
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    for model, converted in (
        (unet, convert_ldm_unet_checkpoint(ldm, unet.config)),
        (vae, convert_ldm_vae_checkpoint(ldm, vae.config)),
        (clip, {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ldm).items()}),
    ):
        state = model.state_dict()
        assert converted.keys() == state.keys()
        assert all(converted[k].shape == state[k].shape for k in state)


def test_shipped_tokenizer_is_clips():
    tokenizer = CLIPTokenizer.from_pretrained(SD15_CONFIG_DIR / "tokenizer")
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    ids = tokenizer("A photograph of an astronaut riding a horse").input_ids
    assert ids == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]


def test_the_toy_bases_training_defaults_are_the_toy_recipe():
    """The bundled base's `training_defaults.json` is the toy world's recipe (the product reads the file, never the
    toy world's code); `toyworld pretrain` writes it, or rewrite it from `RECIPE.training_defaults()`."""
    from spectral_diffusion.toyworld.recipe import RECIPE

    assert RECIPE.training_defaults() == {**RECIPE.settings("additive"), "flip": False}
    assert models.training_defaults("toy") == RECIPE.training_defaults()


def test_training_defaults_come_from_the_base_folder(tmp_path, tiny_model_dir):
    from spectral_diffusion.training.config import TrainConfig
    from spectral_diffusion.ui.backend import recipe_for

    assert models.training_defaults(str(tiny_model_dir)) == {}
    assert recipe_for(str(tiny_model_dir))["steps"] == TrainConfig.steps  # no file: TrainConfig's defaults
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / models.TRAINING_DEFAULTS_FILE).write_text(json.dumps({"steps": 12, "rank": 2}))
    recipe = recipe_for(str(folder))
    assert (recipe["steps"], recipe["rank"], recipe["lr_emb"]) == (12, 2, TrainConfig.lr_emb)
    # a captions file the folder names is read from the folder, wherever the command runs
    (folder / models.TRAINING_DEFAULTS_FILE).write_text(json.dumps({"locality_captions": "captions.txt"}))
    assert recipe_for(str(folder))["locality_captions"] == str(folder / "captions.txt")
    (folder / models.TRAINING_DEFAULTS_FILE).write_text(json.dumps({"steps": 12, "out": "elsewhere"}))
    with pytest.raises(SpectralDiffusionError, match="unknown settings: out"):
        recipe_for(str(folder))
    (folder / models.TRAINING_DEFAULTS_FILE).write_text(json.dumps({"overwrite": True, "resume": True}))
    with pytest.raises(SpectralDiffusionError, match="unknown settings: overwrite, resume$"):
        recipe_for(str(folder))  # a base's file never decides to overwrite or resume the user's run
    (folder / models.TRAINING_DEFAULTS_FILE).write_text("[1]")
    with pytest.raises(SpectralDiffusionError, match="JSON object"):
        models.training_defaults(str(folder))
