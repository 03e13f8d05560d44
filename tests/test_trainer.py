"""The training loop on the tiny model: what changes, that it learns, exact resume, refusals, and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from spectral_diffusion.adapters import adapter_layers
from spectral_diffusion.cli import main
from spectral_diffusion.concept_file import load_concept
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.fusion import ordinary_prompts
from spectral_diffusion.training import trainer as trainer_module
from spectral_diffusion.training.checkpoint import checkpoint_dir
from spectral_diffusion.training.config import TrainConfig
from spectral_diffusion.training.trainer import StepInfo, Trainer, masked_mse, snr_weights, train

PHOTOS = Path(__file__).parent / "data" / "photos"


@pytest.fixture(scope="module")
def svd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SVD cache for the module, so the tiny model's SVD is computed once."""
    return tmp_path_factory.mktemp("svd")


@pytest.fixture(autouse=True)
def cache_root(tmp_path: Path, svd_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache root per test (so band registries do not leak between tests) sharing the module's SVDs."""
    root = tmp_path / "cache"
    root.mkdir()
    (root / "svd").symlink_to(svd_dir)
    monkeypatch.setenv("SPECTRAL_DIFFUSION_CACHE", str(root))
    return root


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    shutil.copytree(PHOTOS, folder, ignore=shutil.ignore_patterns("*.md"))
    return folder


def _config(photos: Path, out: Path, base: Path, **kw) -> TrainConfig:
    settings = {"steps": 2, "batch_size": 1, "rank": 4, "preview_images": 0, "checkpoint_every": 0, "seed": 3}
    return TrainConfig(photo_dir=photos, token="<dogA>", class_word="dog", out=out, base=str(base),
                       **{**settings, **kw})


def _base_weights(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().clone() for name in ("unet", "text_encoder", "vae")
            for k, v in getattr(pipe, name).state_dict().items()}


def test_only_adapters_and_new_token_rows_change_and_the_pipeline_comes_back(tiny_pipe: StableDiffusionPipeline,
                                                                             photos: Path, tmp_path: Path,
                                                                             tiny_model_dir: Path) -> None:
    before = _base_weights(tiny_pipe)
    vocab = len(tiny_pipe.tokenizer)
    out = train(_config(photos, tmp_path / "dogA.safetensors", tiny_model_dir, steps=3, lr_text=1e-3,
                        targets="attn+ff+conv"), pipe=tiny_pipe)
    concept = load_concept(out)
    kernels = concept.meta.kernels  # every adapted convolution, for export
    assert kernels["unet.down_blocks.0.resnets.0.conv1"] == [3, 3]
    assert kernels["unet.down_blocks.0.attentions.0.proj_in"] == [1, 1]
    assert not any(name.startswith("text_encoder.") for name in kernels)
    trained = {k: v for state in concept.layers.values() for k, v in state.items() if k in ("A", "B", "c")}
    assert trained and all(v.abs().sum() > 0 for v in trained.values())  # every trainable moved off zero
    assert any(name.startswith("text_encoder.") for name in concept.layers)
    # The given pipeline comes back as it came: no adapter, token or embedding row of the run, weights untouched.
    assert not adapter_layers(tiny_pipe.unet, tiny_pipe.text_encoder) and len(tiny_pipe.tokenizer) == vocab
    after = _base_weights(tiny_pipe)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert concept.token_embeddings.shape == (2, tiny_pipe.text_encoder.config.hidden_size)
    assert concept.meta.token_names == ["<doga>", "<doga>_1"] and concept.meta.band == 0


def test_loss_falls_when_overfitting_one_batch(tiny_pipe: StableDiffusionPipeline, tmp_path: Path,
                                               tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(PHOTOS / "lion.jpg", folder)
    # The same crop, noise and timestep every step: a fixed batch to overfit.
    monkeypatch.setattr(trainer_module, "sample_generator", lambda seed, index, stream=0: torch.Generator().manual_seed(0))
    losses: list[float] = []
    train(_config(folder, tmp_path / "lion.safetensors", tiny_model_dir, steps=50, flip=False, lr_unet=1e-2,
                  lr_text=1e-3, noise_offset=0.0, warmup_steps=0), pipe=tiny_pipe,
          on_step=lambda info: losses.append(info.loss))
    assert len(losses) == 50
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], (losses[0], losses[-5:])


def test_resume_reaches_the_same_weights(photos: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    prior = tmp_path / "prior"
    prior.mkdir()
    Image.new("RGB", (24, 20), (90, 120, 40)).save(prior / "ordinary.png")
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (0, 0, 128, 256))
    mask.save(photos / "lion_mask.png")
    settings = {"band": 1, "steps": 6, "grad_accum": 2, "prior_dir": prior, "prior_weight": 0.5, "snr_gamma": 5.0,
                "mask_floor": 0.1, "checkpoint_every": 2, "lr_text": 1e-3}
    straight = train(_config(photos, tmp_path / "straight.safetensors", tiny_model_dir, **settings))

    resumed_out = tmp_path / "resumed.safetensors"

    def stop_at_3(info: StepInfo) -> None:
        if info.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_config(photos, resumed_out, tiny_model_dir, **settings), on_step=stop_at_3)
    saved = sorted(p.name for p in checkpoint_dir(resumed_out).iterdir())
    assert saved == ["step-000002.pt", "step-000003.pt"] and not resumed_out.exists()
    with pytest.raises(SpectralDiffusionError, match="holds checkpoints of an earlier run: pass --resume"):
        train(_config(photos, resumed_out, tiny_model_dir, **settings))
    with pytest.raises(SpectralDiffusionError, match=r"settings changed \(rank 4 -> 8"):
        train(_config(photos, resumed_out, tiny_model_dir, **{**settings, "rank": 8}, resume=True))
    steps_seen: list[int] = []
    train(_config(photos, resumed_out, tiny_model_dir, **settings, resume=True),
          on_step=lambda info: steps_seen.append(info.step))
    assert steps_seen == [4, 5, 6]
    assert not checkpoint_dir(resumed_out).exists()  # cleaned up once the concept is written
    a, b = load_file(straight), load_file(resumed_out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(("change", "message"), [
    ({"mixed_precision": "fp8"}, "--mixed-precision must be one of no, fp16, bf16, got 'fp8'"),
    ({"variant": "dora"}, "unknown adapter variant 'dora'"),
    ({"steps": 0}, "--steps must be at least 1"),
    ({"band": -1}, "--band must be 'auto' or a non-negative integer"),
    ({"out": "concept.pt"}, "must end in .safetensors"),
    ({"prior_dir": "/no/such/dir"}, "--prior-dir /no/such/dir does not exist"),
    ({"resolution": 4}, "--resolution must be at least 8"),
])
def test_bad_settings_are_refused_before_loading(photos: Path, tmp_path: Path, change: dict, message: str) -> None:
    config = _config(photos, tmp_path / "c.safetensors", tmp_path / "no-such-model")
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(SpectralDiffusionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(config)


def test_existing_out_is_refused_before_anything_else(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "dogA.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(SpectralDiffusionError, match="dogA.safetensors already exists; pass --overwrite"):
        train(_config(photos, out, tmp_path / "no-such-model"))  # the model is never looked at
    assert out.read_bytes() == b"precious"


@pytest.mark.parametrize(("token", "band", "files", "message"), [
    ("dog", "auto", None, "token 'dog' is already in the tokenizer's vocabulary"),
    ("<dogA>", 100, None, "band 100 at rank 4 needs singular vectors up to column 404"),
    ("<dogA>", "auto", {}, "no usable image in"),
    ("<dogA>", "auto", {"x.png": b"\x89PNG broken", "y.jpg": b"junk"}, "no usable image in"),
])
def test_bad_inputs_give_their_message(tiny_pipe: StableDiffusionPipeline, tmp_path: Path, photos: Path,
                                       tiny_model_dir: Path, token: str, band: int | str,
                                       files: dict[str, bytes] | None, message: str) -> None:
    folder = photos
    if files is not None:
        folder = tmp_path / "bad"
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
    config = _config(folder, tmp_path / "c.safetensors", tiny_model_dir, band=band)
    config.token = token
    with pytest.raises(SpectralDiffusionError, match=message):
        Trainer(config, pipe=tiny_pipe)


def test_auto_band_skips_concepts_of_the_same_base(photos: Path, tmp_path: Path, tiny_model_dir: Path,
                                                   cache_root: Path) -> None:
    first = train(_config(photos, tmp_path / "a.safetensors", tiny_model_dir, steps=1))
    second_cfg = _config(photos, tmp_path / "b.safetensors", tiny_model_dir, steps=1)
    second_cfg.token = "<catB>"
    second = train(second_cfg)
    assert (load_concept(first).meta.band, load_concept(second).meta.band) == (0, 1)
    assert not (cache_root / "bands").exists()  # nothing machine-wide: the folder of --out decides
    first.unlink()  # a deleted concept frees its band
    third_cfg = _config(photos, tmp_path / "c.safetensors", tiny_model_dir, steps=1, rank=8)
    third_cfg.token = "<toyC>"
    assert load_concept(train(third_cfg)).meta.band == 1  # rank 8: columns 8..15, after <catB>'s 4..7


def test_cli_trains_and_writes_concept_sidecar_and_preview(photos: Path, tmp_path: Path, tiny_model_dir: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "concepts" / "dogA.safetensors"
    argv = ["train", str(photos), "--token", "<dogA>", "--class-word", "dog", "--base", str(tiny_model_dir),
            "--steps", "2", "--batch-size", "1", "--rank", "4", "--out", str(out), "--preview-images", "2",
            "--sample-steps", "2", "--validation-prompt", "a photo of <dogA> on the beach", "--validate-every", "1",
            "--mixed-precision", "fp16"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "training <doga> in band 0" in captured.err and "training in fp32 on the CPU" in captured.err
    concept = load_concept(out)
    assert (concept.meta.variant, concept.meta.rank, concept.meta.class_word) == ("additive", 4, "dog")
    assert concept.meta.training["steps"] == 2 and concept.meta.training["images"] == ["cheetah1.jpg", "lion.jpg"]
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["trigger_words"] == ["<doga>"] and sidecar["token_names"] == ["<doga>", "<doga>_1"]
    assert sidecar["base_model"] == str(tiny_model_dir.resolve()) and sidecar["band"] == 0
    assert sidecar["example_prompt"] == "a photo of <doga> dog" and sidecar["recommended_weight"] == 1.0
    preview = Image.open(out.parent / sidecar["preview"])
    assert preview.size == (2 * 16, 16)  # one prompt x 2 images at the tiny model's native 16 px
    samples = sorted(p.name for p in (out.parent / "dogA_samples").iterdir())
    assert samples == ["step-000001-0.png", "step-000002-0.png"]
    assert "a photo of <doga> on the beach" in Image.open(out.parent / "dogA_samples" / samples[0]).text["parameters"]

    assert main(argv) == 2  # the same command again: --out exists
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_masked_mse_and_snr_weights() -> None:
    pred, target = torch.zeros(2, 4, 4, 4), torch.ones(2, 4, 4, 4)
    target[:, :, :, 2:] = 3.0  # error 1 on the left half, 9 on the right
    left = torch.zeros(2, 1, 8, 8)
    left[..., :4] = 1  # a pixel-space mask twice the latent size
    torch.testing.assert_close(masked_mse(pred, target, left, 0.0), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(masked_mse(pred, target, left, 1.0), torch.tensor([5.0, 5.0]))
    torch.testing.assert_close(masked_mse(pred, target, left, 0.5), torch.tensor([(1 + 0.5 * 9) / 1.5] * 2))
    eps = DDPMScheduler()
    timesteps = torch.tensor([0, 999])
    snr = eps.alphas_cumprod[timesteps] / (1 - eps.alphas_cumprod[timesteps])
    torch.testing.assert_close(snr_weights(eps, timesteps, 5.0), snr.clamp(max=5.0) / snr)
    v = DDPMScheduler(prediction_type="v_prediction")
    torch.testing.assert_close(snr_weights(v, timesteps, 5.0), snr.clamp(max=5.0) / (snr + 1))


@pytest.mark.parametrize("variant", ["rotational", "lora", "ortho"])
def test_other_variants_train_and_record_their_band(photos: Path, tmp_path: Path, tiny_model_dir: Path,
                                                    variant: str, caplog: pytest.LogCaptureFixture) -> None:
    out = train(_config(photos, tmp_path / f"{variant}.safetensors", tiny_model_dir, variant=variant, band=2,
                        preview_images=1, sample_steps=1))
    concept = load_concept(out)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    spectral = variant == "rotational"
    assert concept.meta.variant == variant and concept.meta.band == sidecar["band"] == (2 if spectral else None)
    assert ("--band is ignored" in caplog.text) is not spectral


def test_a_crash_mid_run_keeps_a_checkpoint(photos: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "dogA.safetensors"

    def fail_at_2(info: StepInfo) -> None:
        if info.step == 2:
            raise RuntimeError("CUDA out of memory (pretend)")

    with pytest.raises(RuntimeError, match="pretend"):
        train(_config(photos, out, tiny_model_dir, steps=4), on_step=fail_at_2)
    assert [p.name for p in checkpoint_dir(out).iterdir()] == ["step-000002.pt"]
    steps: list[int] = []
    train(_config(photos, out, tiny_model_dir, steps=4, resume=True), on_step=lambda info: steps.append(info.step))
    assert steps == [3, 4] and out.is_file()


def test_locality_loss_starts_at_zero_and_trains_only_the_adapters(tiny_pipe: StableDiffusionPipeline, photos: Path,
                                                                    tmp_path: Path, tiny_model_dir: Path) -> None:
    config = _config(photos, tmp_path / "dogA.safetensors", tiny_model_dir, targets="kv", lr_text=1e-3,
                     locality_weight=1.0)
    trainer = Trainer(config, pipe=tiny_pipe)
    captions = ["a photo of <doga> dog", "<doga> dog in the snow"]  # the token as stored: lower case
    assert trainer.locality_loss(captions, torch.Generator().manual_seed(0)).item() == 0.0  # zero-init adapters
    with torch.no_grad():
        for param in trainer.trainables.values():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    encoded: list[str] = []
    encode = trainer._encode_captions
    trainer._encode_captions = lambda texts: encoded.extend(texts) or encode(texts)
    loss = trainer.locality_loss(captions, torch.Generator().manual_seed(0))
    assert loss.item() > 0
    # the token dropped, the empty prompt (classifier-free guidance's unconditional branch), then the captions
    assert encoded == ["a photo of dog", "dog in the snow", "", *captions]
    loss.backward()
    grads = {n: p.grad for n, p in trainer.trainables.items()}
    assert grads["embeddings.rows"] is None  # prompts without the concept's own vectors: the token is free
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("unet."))
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("text_encoder."))
    out = trainer.run()
    assert load_concept(out).meta.training["locality_weight"] == 1.0
    assert load_concept(out).meta.training["captions"]
    # no --locality-captions, no key: files and checkpoints from before the option compare equal
    assert "locality_captions" not in load_concept(out).meta.training


def test_locality_captions_join_the_term_and_the_concept_file(tiny_pipe: StableDiffusionPipeline, photos: Path,
                                                              tmp_path: Path, tiny_model_dir: Path) -> None:
    """`--locality-captions`: each step draws as many ordinary captions as it has captions (seeded), the concept
    file records them, and closed-form fusion keeps them at the base's mapping."""
    pool = tmp_path / "captions.txt"
    pool.write_text("a cat on the sea\n\na photo of <doga> dog\na red car\n", encoding="utf-8")
    config = _config(photos, tmp_path / "dogA.safetensors", tiny_model_dir, targets="kv", locality_weight=1.0,
                     locality_captions=pool)
    trainer = Trainer(config, pipe=tiny_pipe)
    assert trainer.locality_captions == ["a cat on the sea", "a photo of dog", "a red car"]  # the token dropped
    encoded: list[str] = []
    encode = trainer._encode_captions
    trainer._encode_captions = lambda texts: encoded.extend(texts) or encode(texts)
    captions = ["a photo of <doga> dog", "<doga> dog in the snow"]
    trainer.locality_loss(captions, torch.Generator().manual_seed(0))
    drawn = torch.randint(3, (2,), generator=torch.Generator().manual_seed(0)).tolist()
    assert encoded == ["a photo of dog", "dog in the snow", "", *[trainer.locality_captions[i] for i in drawn],
                       *captions]
    meta = load_concept(trainer.run()).meta
    assert meta.training["locality_captions"] == ["a cat on the sea", "a photo of dog", "a red car"]
    assert meta.training["locality_prompts"][-1] == "ordinary captions"
    assert {"a cat on the sea", "a red car"} <= set(ordinary_prompts([meta]))
    other = tmp_path / "other.txt"
    for text, message in ((None, "cannot read it as UTF-8 text"), (" \n", "the file holds no prompt")):
        if text is not None:
            other.write_text(text)
        with pytest.raises(SpectralDiffusionError, match=f"^--locality-captions .*other.txt: {message}"):
            _config(photos, tmp_path / "catA.safetensors", tiny_model_dir, locality_weight=1.0,
                    locality_captions=other).check()


def test_files_beside_the_output_and_unwritable_folders_are_refused_before_loading(photos: Path, tmp_path: Path,
                                                                                      tiny_model_dir: Path) -> None:
    out = tmp_path / "dogA.safetensors"
    for beside in (tmp_path / "dogA.json", tmp_path / "dogA.preview.png"):
        beside.write_text("mine")
        with pytest.raises(SpectralDiffusionError, match=f"{beside.name} already exists .*pass --overwrite"):
            _config(photos, out, tiny_model_dir).check()
        assert beside.read_text() == "mine"
        beside.unlink()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(SpectralDiffusionError, match="cannot write to .*a-file"):
        _config(photos, tmp_path / "a-file" / "dogA.safetensors", tiny_model_dir).check()
    for bad in ("nan", "inf"):
        with pytest.raises(SpectralDiffusionError, match="--lr-unet must be a finite number of at least 0"):
            _config(photos, out, tiny_model_dir, lr_unet=float(bad)).check()


def test_a_failed_final_write_keeps_the_training_for_resume(tiny_pipe: StableDiffusionPipeline, photos: Path,
                                                            tmp_path: Path, tiny_model_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "dogA.safetensors"

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer_module, "save_concept", full_disk)
    with pytest.raises(SpectralDiffusionError, match=r"could not write .*dogA.safetensors \(No space left on device\); "
                                                     r"the training state of step 2 is kept in .*--resume"):
        train(_config(photos, out, tiny_model_dir), pipe=tiny_pipe)
    assert not out.exists() and checkpoint_dir(out).is_dir()
    assert not adapter_layers(tiny_pipe.unet, tiny_pipe.text_encoder)  # handed back after a failure too
    assert "<doga>" not in tiny_pipe.tokenizer.get_vocab()
    monkeypatch.undo()
    assert train(_config(photos, out, tiny_model_dir, resume=True)) == out
    assert load_concept(out).meta.training["steps"] == 2 and not checkpoint_dir(out).exists()


def test_two_processes_reach_the_weights_of_one_with_the_same_global_batch(photos: Path, tmp_path: Path,
                                                                           tiny_model_dir: Path) -> None:
    """Data parallel: `torchrun` with 2 CPU processes of batch 1 = one process of batch 2 (every draw belongs to
    its sample, and gradients are averaged over processes)."""
    args = ["train", str(photos), "--token", "<dogA>", "--class-word", "dog", "--base", str(tiny_model_dir),
            "--device", "cpu", "--steps", "3", "--rank", "4", "--band", "0", "--seed", "3", "--preview-images", "0",
            "--checkpoint-every", "0"]
    two = tmp_path / "two.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "spectral_diffusion", *args, "--batch-size", "1",
                    "--out", str(two)], check=True, env=env, capture_output=True, timeout=300)
    one = tmp_path / "one.safetensors"
    assert main([*args, "--batch-size", "2", "--out", str(one)]) == 0
    a, b = load_concept(two), load_concept(one)
    assert a.meta.training["processes"] == 2 and b.meta.training["processes"] == 1
    for layer, state in b.layers.items():
        for key, tensor in state.items():
            torch.testing.assert_close(a.layers[layer][key], tensor, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(a.token_embeddings, b.token_embeddings, atol=1e-4, rtol=1e-3)
