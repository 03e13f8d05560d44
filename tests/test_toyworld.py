"""The toy world: renderer, held-out concepts, bundled base model, judge, pretraining plumbing."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from spectral_diffusion.adapters import find_targets
from spectral_diffusion.bands import weight_matrix
from spectral_diffusion.cli import main
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.models import training_defaults
from spectral_diffusion.testing.tiny_sd import save_tiny_model
from spectral_diffusion.tokenizer import build_clip_tokenizer
from spectral_diffusion.toyworld import concepts, model, render
from spectral_diffusion.toyworld.evaluate import evaluate_base
from spectral_diffusion.toyworld.judge import JUDGE_PATH, Judge
from spectral_diffusion.toyworld.pretrain import PretrainConfig, lr_factor, pretrain, scene_dataset
from spectral_diffusion.toyworld.recipe import RECIPE

REPO = Path(__file__).resolve().parents[1]
CONCEPT_ROOT = REPO / "concepts" / "toyworld"
MODEL_TRAINED = (model.MODEL_DIR / "model_index.json").is_file()


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_render_is_deterministic_per_seed():
    a = [render.render_scene(render.sample_spec(random.Random(7))) for _ in range(2)]
    b = render.render_scene(render.sample_spec(random.Random(8)))
    assert a[0].size == (64, 64) and a[0].mode == "RGB"
    assert np.array_equal(_pixels(a[0]), _pixels(a[1]))
    assert not np.array_equal(_pixels(a[0]), _pixels(b))


def test_caption_names_the_spec_and_uses_only_vocabulary_words(tmp_path):
    rng = random.Random(0)
    vocabulary = set(model.vocabulary())
    tokenizer = build_clip_tokenizer(vocabulary, tmp_path)
    for _ in range(50):
        spec = render.sample_spec(rng)
        text = render.caption(spec, size=True, position=True, photo=True)
        assert f"{spec.size} {spec.colour} {spec.shape}" in text
        assert text.endswith(f"on a {spec.background} background")
        assert render.POSITION_PHRASES[spec.position] in text
        assert set(text.split()) <= vocabulary  # the tokenizer's word list covers every caption
        assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    assert render.caption(render.SceneSpec("star", "red", "gray", "small", "left", 0.3, 0.5)) == \
        "a red star on a gray background"


def test_scene_spec_rejects_unknown_attributes():
    with pytest.raises(SpectralDiffusionError, match="unknown colour 'teal'"):
        render.SceneSpec("star", "teal", "gray", "small", "left", 0.3, 0.5)


def test_patterned_scenes_are_captioned_in_vocabulary_words_and_drawn_in_both_colours():
    vocabulary = set(model.vocabulary())
    for pattern in ("two-tone", "striped", "checkered", "spotted"):
        spec = render.SceneSpec("fish", "blue", "sky", "large", "center", 0.5, 0.5, pattern, "orange")
        text = render.caption(spec, photo=True)
        word = "" if pattern == "two-tone" else f" {pattern}"
        assert text == f"a photo of a blue and orange{word} fish on a sky background"
        assert set(text.split()) <= vocabulary
        pixels = _pixels(render.render_scene(spec)).reshape(-1, 3)
        for colour in ("blue", "orange"):  # each colour covers part of the object
            assert (np.abs(pixels - np.array(render.COLOURS[colour])).max(1) < 8).sum() > 20, (pattern, colour)
    two_tone = _pixels(render.render_scene(render.SceneSpec("square", "red", "gray", "large", "center", 0.5, 0.5,
                                                            "two-tone", "green")))
    assert np.abs(two_tone[26, 32] - render.COLOURS["red"]).max() < 8  # the first colour above the centre line
    assert np.abs(two_tone[38, 32] - render.COLOURS["green"]).max() < 8


def test_tricolour_scenes_draw_three_vertical_bands_and_houses_a_door():
    vocabulary = set(model.vocabulary())
    flag_like = render.SceneSpec("square", "blue", "gray", "large", "center", 0.5, 0.5, "tricolour", "white",
                                 "black")
    assert render.caption(flag_like) == "a blue and white and black square on a gray background"
    pixels = _pixels(render.render_scene(flag_like))
    for column, colour in ((22, "blue"), (32, "white"), (42, "black")):  # left to right, any row
        for row in (22, 32, 42):
            assert np.abs(pixels[row, column] - render.COLOURS[colour]).max() < 8, (row, column, colour)
    house = render.SceneSpec("house", "blue", "sky", "large", "center", 0.5, 0.5, "two-tone", "white", door="red")
    text = render.caption(house, photo=True)
    assert text == "a photo of a blue and white house with a red door on a sky background"
    assert set(text.split()) <= vocabulary
    doorless = _pixels(render.render_scene(render.SceneSpec("house", "blue", "sky", "large", "center", 0.5, 0.5,
                                                            "two-tone", "white")))
    changed = np.abs(_pixels(render.render_scene(house)) - doorless).max(2) > 0
    rows, columns = np.nonzero(changed)
    assert 30 < changed.sum() < 120  # a door at the foot of the walls, in the middle
    assert 36 <= rows.min() <= rows.max() <= 48 and 25 <= columns.min() <= columns.max() <= 39
    assert np.abs(_pixels(render.render_scene(house))[44, 32] - render.COLOURS["red"]).max() < 8


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"pattern": "tricolour", "colour2": "red"}, "a tricolour scene needs a third colour"),
    ({"pattern": "tricolour", "colour2": "red", "colour3": "blue"}, "a tricolour scene needs a third colour"),
    ({"pattern": "striped", "colour2": "red", "colour3": "green"}, "a tricolour scene needs a third colour"),
    ({"door": "red"}, "only a house has a door"),
    ({"shape": "house", "door": "blue"}, "only a house has a door, in a colour unlike the house's"),
    ({"shape": "house", "door": "teal"}, "unknown colour 'teal'"),
])
def test_scene_spec_rejects_bad_tricolours_and_doors(kwargs, message):
    fields = {"shape": "star", "colour": "blue", "background": "gray", "size": "small", "position": "left",
              "x": 0.3, "y": 0.5} | kwargs
    with pytest.raises(SpectralDiffusionError, match=message):
        render.SceneSpec(**fields)


@pytest.mark.parametrize(("pattern", "colour2", "message"), [
    ("plain", "red", "a patterned scene needs a second colour"),
    ("striped", None, "a patterned scene needs a second colour"),
    ("striped", "blue", "a patterned scene needs a second colour"),
    ("zigzag", "red", "unknown pattern 'zigzag'"),
    ("striped", "teal", "unknown colour 'teal'"),
])
def test_scene_spec_rejects_bad_patterns(pattern, colour2, message):
    with pytest.raises(SpectralDiffusionError, match=message):
        render.SceneSpec("star", "blue", "gray", "small", "left", 0.3, 0.5, pattern, colour2)


def test_pretraining_scenes_mix_patterns_and_never_draw_a_concept_lookalike():
    lookalikes = [c for c in concepts.CONCEPTS.values() if c.lookalike is not None]
    assert len(lookalikes) >= 5
    for concept in lookalikes:
        pattern, colours = concept.lookalike
        for order in itertools.permutations(sorted(colours)):  # in any order
            assert concepts.is_lookalike(render.SceneSpec(concept.class_word, order[0], "gray", "large", "center",
                                                          0.5, 0.5, pattern, *order[1:]))
    house = concepts.CONCEPTS["red_door_house"].lookalike
    assert concepts.is_lookalike(render.SceneSpec("house", "blue", "gray", "large", "center", 0.5, 0.5, house[0],
                                                  "yellow", door="red"))  # with a door or without
    for shape, third in (("square", "blue"), ("circle", "red")):  # another colour, or another class word: allowed
        assert not concepts.is_lookalike(render.SceneSpec(shape, "green", "gray", "large", "center", 0.5, 0.5,
                                                          "tricolour", "white", third))
    specs, pixels = scene_dataset(400, seed=3, pattern_share=0.5)
    patterned = [s for s in specs if s.pattern != "plain"]
    assert 150 < len(patterned) < 250 and pixels.shape == (400, 3, 64, 64)
    assert {s.pattern for s in patterned} == set(render.PATTERNS) - {"plain"}
    assert any(s.door for s in patterned) and not any(s.door for s in specs if s.pattern == "plain")
    assert not any(concepts.is_lookalike(s) for s in specs)
    assert all(s.pattern == "plain" for s in scene_dataset(50, seed=3)[0])


def test_object_colours_differ_from_backgrounds():
    """Every object colour stays visible on every background (mean distance in RGB)."""
    for name in render.BACKGROUNDS:
        mean = np.asarray(render.draw_background(name), dtype=float).reshape(-1, 3).mean(0)
        for colour, rgb in render.COLOURS.items():
            assert np.linalg.norm(mean - np.array(rgb)) > 60, (name, colour)


def test_concept_folders_are_committed_and_reproducible(tmp_path):
    assert set(concepts.CONCEPTS) <= {p.name for p in CONCEPT_ROOT.iterdir() if p.is_dir()}
    assert len(concepts.CONCEPTS) >= 10
    for name, concept in concepts.CONCEPTS.items():
        assert concept.class_word in render.SHAPES  # the class prior exists in the base vocabulary
        pngs = sorted((CONCEPT_ROOT / name).glob("*.png"))
        assert 6 <= len(pngs) <= 8
        for png in pngs:
            text = png.with_suffix(".txt").read_text().strip()
            assert text.startswith("a photo of {token} " + concept.class_word)
            assert any(f"on a {bg} background" in text for bg in concepts.TRAIN_BACKGROUNDS)
    fresh = concepts.write_concept_folder("striped_fish", tmp_path, count=len(pngs))
    for new, old in zip(fresh, sorted((CONCEPT_ROOT / "striped_fish").glob("*.png")), strict=True):
        assert np.array_equal(_pixels(_open(new)), _pixels(_open(old)))


def _open(path):
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


def test_unknown_concept_is_a_user_error():
    with pytest.raises(SpectralDiffusionError, match="unknown toy concept 'dog'"):
        concepts.render_concept("dog", random.Random(0))


def test_every_adaptable_layer_fits_eight_rank4_bands(tmp_path):
    # every layer of the widest preset (3x3 convs as [out, in*9]) has 8 bands of rank 4
    pipe = model.build_pipeline(tmp_path / "tok")
    targets = find_targets(pipe.unet, pipe.text_encoder, "attn+ff+conv")
    assert len(targets) > 100
    for name, module in targets.items():
        assert min(weight_matrix(module).shape) >= 8 * 4, name


def test_toy_unet_has_the_block_layout_of_sd15():
    """SD 1.x's blocks at toy sizes: cross-attention at every level but the lowest, and in the mid block."""
    sd15 = json.loads((Path(model.__file__).parents[1] / "configs" / "sd15" / "unet" / "config.json").read_text())
    unet = model.build_unet()
    for key in ("down_block_types", "up_block_types"):
        assert list(unet.config[key]) == sd15[key], key
    assert unet.config.mid_block_type == "UNetMidBlock2DCrossAttn"
    cross = {n.split(".attentions")[0] for n, _ in unet.named_modules() if n.endswith("attn2.to_k")}
    assert cross == {"down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block",
                     "up_blocks.1", "up_blocks.2", "up_blocks.3"}


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    assert lr_factor(0, 0.0, warmup=10) == pytest.approx(0.1)
    assert lr_factor(10, 0.0, warmup=10) == pytest.approx(1.0)
    assert lr_factor(500, 0.5, warmup=10) == pytest.approx(0.525)
    assert lr_factor(900, 1.0, warmup=10) == pytest.approx(0.05)


def test_pretrain_plumbing_exports_a_loadable_fp16_pipeline(tmp_path):
    """Zero-minute budgets: data, latent cache, export and resume run end to end in seconds."""
    cfg = PretrainConfig(out=tmp_path / "run", model_dir=tmp_path / "model", vae_minutes=0, unet_minutes=0,
                         num_scenes=48)
    assert pretrain(cfg) == tmp_path / "model"
    with safe_open(tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    assert "latent scaling factor" in (tmp_path / "run" / "log.txt").read_text()
    assert training_defaults(str(tmp_path / "model")) == RECIPE.training_defaults()  # the app's recipe
    with pytest.raises(SpectralDiffusionError, match="already holds checkpoints: pass --resume"):
        pretrain(cfg)
    cfg.resume = True
    pretrain(cfg)
    assert "vae: resumed" in (tmp_path / "run" / "log.txt").read_text()


def test_pretrain_takes_real_steps_in_both_stages(tmp_path):
    """Budgets of a second: both stages' steps run (clutter, noise draws per caption, checkpoints)."""
    cfg = PretrainConfig(out=tmp_path / "run", model_dir=tmp_path / "model", vae_minutes=0.01, unet_minutes=0.01,
                         num_scenes=48, vae_batch=4, unet_batch=4, noise_draws=2)
    pretrain(cfg)
    for stage in ("vae", "unet"):
        assert torch.load(tmp_path / "run" / f"{stage}.ckpt", weights_only=False)["state"]["step"] > 0, stage
    assert (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize(("batch", "draws", "message"), [
    (5, 2, "--unet-batch 5 is not a multiple of --noise-draws 2"),
    (64, 0, "--noise-draws must be at least 1, not 0"),
])
def test_pretrain_refuses_bad_noise_draws_before_writing(tmp_path, batch, draws, message):
    with pytest.raises(SpectralDiffusionError, match=message):
        pretrain(PretrainConfig(out=tmp_path / "run", unet_batch=batch, noise_draws=draws))
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not MODEL_TRAINED, reason="the bundled toy model is not trained yet "
                    "(spectral-diffusion toyworld pretrain)")
def test_bundled_model_loads_in_plain_diffusers_on_cpu():
    """As a user types it, no dtype: every component in fp32 (a stored-fp16 text encoder beside an fp32 UNet fails)."""
    pipe = StableDiffusionPipeline.from_pretrained(model.MODEL_DIR)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    size_mb = sum(p.stat().st_size for p in model.MODEL_DIR.rglob("*") if p.is_file()) / 2**20
    assert size_mb <= 30
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red star on a gray background", num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


@pytest.fixture(scope="module")
def judge() -> Judge:
    if not JUDGE_PATH.is_file():
        pytest.skip("the judge is not trained yet (spectral-diffusion toyworld train-judge)")
    return Judge.load()


def test_judge_reads_clean_renders(judge):
    rng = random.Random(123)
    specs = [render.sample_spec(rng) for _ in range(48)]
    accuracy = judge.shape_colour_background_accuracy([render.render_scene(s) for s in specs], specs)
    assert min(accuracy["shape"], accuracy["colour"], accuracy["background"]) >= 0.9, accuracy
    names = list(concepts.CONCEPTS)
    photos = [concepts.render_concept(n, rng) for n in names]
    predicted = judge.predict(photos)["concept"].argmax(1).tolist()
    assert sum(p == 1 + k for k, p in enumerate(predicted)) >= 0.9 * len(names)
    fish = [concepts.render_concept("striped_fish", rng, background="dotted") for _ in range(4)]
    assert judge.identity_score(fish, "striped_fish") > 0.8
    assert judge.identity_score(fish, "bullseye") < 0.1
    assert judge.background_match(fish, "dotted") > 0.8
    with pytest.raises(SpectralDiffusionError, match="unknown concept 'dog'"):
        judge.identity_score(fish, "dog")
    # ordinary patterned things of the base world are not concepts
    patterned = [render.render_scene(render.sample_patterned_spec(rng, concepts.is_lookalike)) for _ in range(48)]
    assert (judge.predict(patterned)["concept"].argmax(1) == 0).float().mean() >= 0.9


def test_evaluate_base_scores_generated_images(judge, tmp_path):
    pipe = model.build_pipeline(tmp_path / "tok")  # random weights: exercises the function, not the model
    pipe.set_progress_bar_config(disable=True)
    metrics, images, specs = evaluate_base(pipe, judge, num=3, steps=2, batch=2)
    assert len(images) == len(specs) == 3 and images[0].size == (64, 64)
    assert set(metrics) == {"shape", "colour", "background", "all"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert metrics["all"] <= min(metrics["shape"], metrics["colour"], metrics["background"])


def test_cli_render_concepts_writes_folders(tmp_path, capsys):
    assert main(["toyworld", "render-concepts", "--out", str(tmp_path), "--count", "6"]) == 0
    assert len(list((tmp_path / "bullseye").glob("*.png"))) == 6
    assert "bullseye" in (tmp_path / "README.md").read_text()
    assert str(tmp_path / "bullseye") in capsys.readouterr().out


def test_cli_pretrain_takes_its_defaults_from_the_config(tmp_path, capsys):
    # the default --unet-batch (PretrainConfig's 64) reaches the check: one line, exit 2, nothing written
    assert main(["toyworld", "pretrain", "--out", str(tmp_path / "run"), "--noise-draws", "3"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --unet-batch {PretrainConfig.unet_batch} is not a multiple of --noise-draws 3")
    assert not (tmp_path / "run").exists()


def test_cli_train_judge_writes_weights_and_report(tmp_path, capsys):
    out = tmp_path / "judge.safetensors"
    assert main(["toyworld", "train-judge", "--out", str(out), "--steps", "2", "--vae-from", "none"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"clean", "augmented"} and set(report["clean"]) == {"concept", "shape", "colour",
                                                                             "background"}
    assert Judge.load(out).predict([render.render_scene(render.sample_spec(random.Random(0)))])["shape"].shape == (1, 8)
    assert json.loads(out.with_suffix(".json").read_text())["validation"] == report


def test_pretrain_reuses_the_vae_of_a_model_folder(tmp_path):
    first = PretrainConfig(out=tmp_path / "run", model_dir=tmp_path / "model", vae_minutes=0, unet_minutes=0,
                           num_scenes=48)
    pretrain(first)
    with pytest.raises(SpectralDiffusionError, match="--vae-from .*no vae/\\*.safetensors"):
        pretrain(PretrainConfig(out=tmp_path / "bad", model_dir=tmp_path / "m2", vae_from=tmp_path / "run",
                                unet_minutes=0, num_scenes=48))
    assert not (tmp_path / "bad").exists()  # refused before rendering or writing anything
    second = PretrainConfig(out=tmp_path / "run2", model_dir=tmp_path / "model2", vae_from=tmp_path / "model",
                            unet_minutes=0, num_scenes=48)
    pretrain(second)
    assert "vae: reused from" in (tmp_path / "run2" / "log.txt").read_text()
    assert not (tmp_path / "run2" / "vae.ckpt").exists()  # stage 1 skipped
    with safe_open(tmp_path / "model" / "vae" / "diffusion_pytorch_model.safetensors", "pt") as a, \
            safe_open(tmp_path / "model2" / "vae" / "diffusion_pytorch_model.safetensors", "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118 (safe_open is not iterable)


def test_pretrain_fine_tunes_from_a_model_folder_of_the_same_vocabulary(tmp_path):
    first = PretrainConfig(out=tmp_path / "run", model_dir=tmp_path / "model", vae_minutes=0, unet_minutes=0,
                           num_scenes=48)
    pretrain(first)
    with pytest.raises(SpectralDiffusionError, match="--init-from .*no unet/\\*.safetensors"):
        pretrain(PretrainConfig(out=tmp_path / "bad", init_from=tmp_path / "run", num_scenes=48))
    with pytest.raises(SpectralDiffusionError, match="--init-from .*tokenizer vocabulary is not the toy world's"):
        pretrain(PretrainConfig(out=tmp_path / "bad", init_from=save_tiny_model(tmp_path / "tiny"), num_scenes=48))
    with pytest.raises(SpectralDiffusionError, match="--pattern-share must be between 0 and 1, not 1.5"):
        pretrain(PretrainConfig(out=tmp_path / "bad", pattern_share=1.5))
    assert not (tmp_path / "bad").exists()  # refused before rendering or writing anything
    second = PretrainConfig(out=tmp_path / "run2", model_dir=tmp_path / "model2", vae_from=tmp_path / "model",
                            init_from=tmp_path / "model", unet_minutes=0, num_scenes=48)
    pretrain(second)
    assert "starting from" in (tmp_path / "run2" / "log.txt").read_text()
    for component in ("unet", "text_encoder"):  # no step taken: the export is the model it started from
        name = "diffusion_pytorch_model" if component == "unet" else "model"
        with safe_open(tmp_path / "model" / component / f"{name}.safetensors", "pt") as a, \
                safe_open(tmp_path / "model2" / component / f"{name}.safetensors", "pt") as b:
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118
