"""One name per command module and per option across commands (old spellings kept), mistakes said before the base
loads, the app's own share hint, and the dependencies' implementations where they give the project's result."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from diffusers.utils import convert_state_dict_to_kohya
from peft.utils.merge_utils import ties
from PIL import Image
from safetensors.torch import load_file

from spectral_diffusion.cli import COMMANDS, build_parser, main
from spectral_diffusion.cli import app as app_cli
from spectral_diffusion.cli.options import config_from_args
from spectral_diffusion.cli.toyworld import PRETRAIN_FLAGS
from spectral_diffusion.concept_file import save_concept
from spectral_diffusion.export import lora_state_dict
from spectral_diffusion.fusion import ties_merge
from spectral_diffusion.generation import SCHEDULERS
from spectral_diffusion.models import BaseSpec
from spectral_diffusion.testing.tiny_sd import random_concept
from spectral_diffusion.toyworld.pretrain import PretrainConfig
from spectral_diffusion.training.config import TrainConfig


def test_lora_format_has_one_name_in_fuse_and_export(tmp_path: Path, tiny_pipe) -> None:
    concept = save_concept(tmp_path / "dogA.safetensors", random_concept(tiny_pipe, token="<dogA>"))
    for flag in ("--lora-format", "--format"):  # --format: the older spelling, kept
        out = tmp_path / flag.strip("-") / "lora.safetensors"
        assert main(["export-lora", str(concept), flag, "kohya", "--out", str(out)]) == 0
        assert all(k.startswith("lora_") for k in load_file(out))
    parser = build_parser()
    assert parser.parse_args(["fuse", "c", "--out", "o", "--lora-format", "kohya"]).lora_format == "kohya"


def test_each_command_module_is_named_after_its_sub_command() -> None:
    choices = build_parser()._subparsers._group_actions[0].choices
    assert list(choices) == [name.replace("_", "-") for name in COMMANDS]


def test_flags_are_the_settings_dataclass_fields_with_its_defaults(tmp_path: Path, capsys) -> None:
    parser = build_parser()
    args = parser.parse_args(["train", "photos", "--token", "<x>", "--out", "x.safetensors"])
    config = config_from_args(TrainConfig, args, base=config_from_args(BaseSpec, args))
    assert vars(config) == vars(TrainConfig("photos", "<x>", "x.safetensors"))  # flags left out: the field defaults
    args = parser.parse_args(["toyworld", "pretrain", "--out", "run"])
    assert config_from_args(PretrainConfig, args, PRETRAIN_FLAGS) == PretrainConfig(out=Path("run"))
    # the flags only parse; TrainConfig.check refuses, in the words the Python API gets
    out = str(tmp_path / "x.safetensors")
    assert main(["train", str(tmp_path), "--token", "<x>", "--out", out, "--band", "x3"]) == 2
    assert capsys.readouterr().err.strip() == "error: --band must be 'auto' or a non-negative integer, got 'x3'"


def test_sampler_is_named_as_in_the_png_metadata(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    help_text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    assert "--sampler" in help_text and "euler_a = Euler a" in help_text
    for flag in ("--sampler", "--scheduler"):
        out = tmp_path / flag.strip("-")
        assert main(["generate", "--base", str(tiny_model_dir), "--prompt", "a dog", "--steps", "2", flag, "euler_a",
                     "--out", str(out)]) == 0
        (png,) = out.iterdir()
        assert "Sampler: Euler a" in Image.open(png).text["parameters"]
    assert set(SCHEDULERS) >= {"euler_a", "dpm++"}


@pytest.mark.parametrize("command", ["generate", "fuse"])
def test_a_missing_concept_file_is_said_before_the_base_loads(tmp_path: Path, monkeypatch, capsys,
                                                              command: str) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr("spectral_diffusion.models.load_base", no_loading)
    missing = str(tmp_path / "missing.safetensors")
    argv = (["generate", "--concepts", missing, "--prompt", "x", "--out", str(tmp_path / "images")]
            if command == "generate" else ["fuse", missing, "--out", str(tmp_path / "fused")])
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"error: concept file {missing} not found"


def test_the_app_hints_at_its_own_share_flag(monkeypatch, capsys) -> None:
    class Demo:
        local_url = "http://127.0.0.1:7860/"

        def block_thread(self) -> None:
            pass

    seen = {}
    monkeypatch.setattr("spectral_diffusion.ui.app.launch", lambda backend, **kw: seen.update(kw) or Demo())
    monkeypatch.setattr("spectral_diffusion.ui.backend.Backend", lambda *a, **kw: None)
    monkeypatch.setattr("spectral_diffusion.models.BaseSpec.load", lambda spec: None)
    args = argparse.Namespace(host="127.0.0.1", port=7860, share=False, concepts_dir="c", output_dir="o",
                              spec="toy", config=None, allow_pickle=False, device=None, dtype=None)
    assert app_cli.run(args) == 0
    assert seen["quiet"] is True  # gradio's own lines would say "set `share=True` in `launch()`"
    assert capsys.readouterr().out.splitlines() == ["* Running on local URL: http://127.0.0.1:7860/",
                                                    "* To create a public link, add --share"]


def test_kohya_keys_are_diffusers_conversion_in_the_sd1_spelling(tiny_pipe) -> None:
    """diffusers' `convert_state_dict_to_kohya` gives the same tensors under the same keys, except that it names
    the text encoder `lora_te1_` (SDXL's first encoder) where SD 1.x files say `lora_te_`, and writes integer
    alphas: the project keeps its own writer for those two differences."""
    concept = random_concept(tiny_pipe, variant="additive", rank=4, targets="attn+ff+conv")
    ours = lora_state_dict(concept, "kohya")
    theirs = convert_state_dict_to_kohya(lora_state_dict(concept, "peft"))
    respelled = {k.replace("lora_te1_", "lora_te_"): v for k, v in theirs.items()}
    assert respelled.keys() == ours.keys()
    assert all(torch.equal(respelled[k].float(), ours[k]) for k in ours)
    assert any(k.startswith("lora_te1_") for k in theirs)


def test_ties_is_peft_ties_where_the_trim_counts_agree() -> None:
    gen = torch.Generator().manual_seed(0)
    deltas = [torch.randn(8, 6, generator=gen) * w for w in (1.0, 0.7, 1.3)]
    for density in (0.25, 0.5, 0.75):  # density * 48 entries is a whole number: both keep the same entries
        assert torch.equal(ties_merge(deltas, density), ties(deltas, torch.ones(3), density))

