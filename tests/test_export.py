"""LoRA export: diffusers' own loaders reproduce the concept as this package applies it."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from spectral_diffusion.adapters.inject import load_adapter
from spectral_diffusion.cli import main
from spectral_diffusion.concept_file import save_concept
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.export import export_lora, lora_state_dict
from spectral_diffusion.testing.tiny_sd import random_concept
from spectral_diffusion.tokens import add_concept_tokens

PROMPT = "a photo of <doga> dog on the beach"  # a plain pipeline's prompt: the trigger as stored


def _fresh(tiny_model_dir) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def _outputs(pipe: StableDiffusionPipeline, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-encoder states for `prompt` and the UNet's noise prediction on fixed latents given them."""
    states = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    noise = pipe.unet(latents, torch.tensor([10, 700]), states.expand(2, -1, -1)).sample
    return states, noise


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
@pytest.mark.parametrize(("variant", "targets"),
                         [("additive", "attn+ff"), ("rotational", "attn+ff"), ("additive", "attn+ff+conv")])
def test_diffusers_loaders_reproduce_the_concept(tmp_path, tiny_model_dir, fmt, variant, targets):
    ours = _fresh(tiny_model_dir)
    concept = random_concept(
        ours, variant=variant, rank=4, band=1, targets=targets, token="<dogA>", n_vectors=2
    )
    load_adapter(ours.unet, ours.text_encoder, variant, concept.layers, name="dogA")
    add_concept_tokens(ours.tokenizer, ours.text_encoder, "<dogA>", concept.token_embeddings)
    expected_states, expected_noise = _outputs(ours, PROMPT)

    result = export_lora(
        save_concept(tmp_path / "dogA.safetensors", concept), tmp_path / "lora.safetensors", fmt
    )
    theirs = _fresh(tiny_model_dir)
    theirs.load_textual_inversion(str(result.embedding))
    assert result.token == "<doga>"
    prompt = PROMPT
    embedding_only_states, embedding_only_noise = _outputs(theirs, prompt)
    theirs.load_lora_weights(str(result.lora))
    states, noise = _outputs(theirs, prompt)

    assert torch.allclose(states, expected_states, atol=1e-4, rtol=0)
    assert torch.allclose(noise, expected_noise, atol=1e-4, rtol=0)
    # ... and the LoRA is what made them equal: without it both outputs are far off.
    assert (embedding_only_states - expected_states).abs().max() > 1e-2
    assert (embedding_only_noise - expected_noise).abs().max() > 1e-2


def test_key_layout_and_scale(tiny_pipe):
    concept = random_concept(tiny_pipe, variant="additive", rank=4, targets="attn+ff+conv")
    peft, kohya = lora_state_dict(concept, "peft"), lora_state_dict(concept, "kohya")
    assert len(peft) == 2 * len(concept.layers) and len(kohya) == 3 * len(concept.layers)
    block = "down_blocks.0.attentions.0"
    assert peft[f"unet.{block}.transformer_blocks.0.attn2.to_k.lora_A.weight"].shape == (8, 32)  # k = 2r
    assert peft[f"unet.{block}.proj_in.lora_A.weight"].shape == (8, 32, 1, 1)  # 1x1 conv
    assert peft[f"unet.{block}.proj_in.lora_B.weight"].shape == (32, 8, 1, 1)
    conv = "unet.down_blocks.0.resnets.0.conv1"  # 3x3, LoCon layout: down is a 3x3 kernel, up a 1x1
    assert peft[f"{conv}.lora_A.weight"].shape == (8, 32, 3, 3) and peft[f"{conv}.lora_B.weight"].shape == (32, 8, 1, 1)
    assert kohya["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (8, 32, 3, 3)
    assert peft["text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_B.weight"].shape == (64, 8)
    kohya_name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert float(kohya[f"{kohya_name}.alpha"]) == 8.0  # alpha = rank: scale 1
    assert torch.equal(kohya[f"{kohya_name}.lora_up.weight"],
                       peft["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"])  # fmt: skip
    layer = f"unet.{block}.transformer_blocks.0.ff.net.2"
    up, down = concept.delta_factors(layer)
    assert torch.equal(peft[f"{layer}.lora_B.weight"] @ peft[f"{layer}.lora_A.weight"], up @ down)


def test_cli_writes_both_files_and_refuses_to_clobber(tmp_path, tiny_pipe, capsys):
    concept = random_concept(tiny_pipe, token="<dogA>")
    concept_path = save_concept(tmp_path / "dogA.safetensors", concept)
    out = tmp_path / "exported" / "dogA-lora.safetensors"
    argv = ["export-lora", str(concept_path), "--format", "kohya", "--out", str(out)]
    assert main(argv) == 0
    assert "(trigger word: <doga>)" in capsys.readouterr().out
    assert all(k.startswith("lora_") for k in load_file(out))
    embedding = load_file(tmp_path / "exported" / "<doga>.safetensors")
    assert list(embedding) == ["<doga>"] and torch.equal(embedding["<doga>"], concept.token_embeddings)
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_bad_inputs(tmp_path, tiny_pipe):
    concept = random_concept(tiny_pipe)
    with pytest.raises(SpectralDiffusionError, match="unknown LoRA format 'comfy'"):
        export_lora(concept, tmp_path / "x.safetensors", "comfy")
    with pytest.raises(SpectralDiffusionError, match="as .safetensors"):
        export_lora(concept, tmp_path / "x.pt")
    with pytest.raises(SpectralDiffusionError, match="not found"):
        export_lora(tmp_path / "missing.safetensors", tmp_path / "x.safetensors")
