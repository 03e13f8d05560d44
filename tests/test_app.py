"""The web app, end to end through its HTTP API: the tiny model, two concepts trained for two steps, gradio_client.

The server runs in this process (`prevent_thread_lock`), so a test can also swap a backend method to check how an
unexpected failure is reported.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import sys
from dataclasses import replace
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from safetensors.torch import save_file

from spectral_diffusion.cli import _MessageFormat as MessageFormat
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.generation import GenerationSettings
from spectral_diffusion.models import BaseSpec
from spectral_diffusion.regional import resolve_region_mode
from spectral_diffusion.training.trainer import TrainConfig, train
from spectral_diffusion.ui.app import _user_errors as user_errors
from spectral_diffusion.ui.app import build_app, concept_card, launch
from spectral_diffusion.ui.backend import INTERNAL_ERROR, Backend
from spectral_diffusion.ui.concepts import list_concepts
from spectral_diffusion.ui.regions import HEADERS, layout_canvas, layout_rows, rows_to_regions
from spectral_diffusion.ui.uploads import child_path, thumbnails

CONCEPTS = {"dogA": ("<dogA>", "dog", 1), "catB": ("<catB>", "cat", 0)}  # token, class word, preview images


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_photos(folder: Path, n: int = 2, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        paths.append(folder / f"photo{i}.png")
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(client, backend) of an app on the tiny model with the concepts dogA (band 0) and catB (band 1)."""
    root = tmp_path_factory.mktemp("app")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECTRAL_DIFFUSION_CACHE", str(root / "cache"))  # the band registry stays in this test
        photos, concepts = root / "photos", root / "concepts"
        write_photos(photos)
        concepts.mkdir()
        for name, (token, class_word, previews) in CONCEPTS.items():
            train(TrainConfig(photo_dir=photos, token=token, class_word=class_word, out=concepts / f"{name}.safetensors",
                              base=str(tiny_model_dir), steps=2, batch_size=1, rank=4, preview_images=previews,
                              sample_steps=1, checkpoint_every=0, concepts_dir=concepts))
        backend = Backend(BaseSpec(str(tiny_model_dir)).load(), concepts_dir=concepts, output_dir=root / "out")
        demo = launch(backend, port=free_port(), prevent_thread_lock=True, quiet=True)
        try:
            yield Client(demo.local_url, verbose=False, download_files=str(root / "downloads")), backend
        finally:
            demo.close()


def generate(client: Client, **overrides):
    args = dict(prompt="a photo of <dogA> dog", negative_prompt="", concepts={}, seed=7, steps=2, guidance_scale=7.0,
                width=16, height=24, scheduler="euler", num_images=1, region_feather=0.0)
    return client.predict(**{**args, **overrides}, api_name="/generate")


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(result[0][0]["image"]).convert("RGB")).astype(np.int16)


def test_concepts_are_listed_with_trigger_band_and_base(served):
    client, backend = served
    listed = {c["name"]: c for c in client.predict(api_name="/concepts")}
    assert set(listed) == set(CONCEPTS)
    assert listed["dogA"]["triggers"] == ["<doga>"] and listed["dogA"]["class_word"] == "dog"
    assert {listed["dogA"]["band"], listed["catB"]["band"]} == {0, 1}
    assert all(c["fits_base"] and c["base_fingerprint"] == backend.fingerprint for c in listed.values())
    previews = {c.name: c.preview for c in backend.concepts()}
    assert previews["dogA"] == backend.concepts_dir / "dogA.preview.png"  # the trainer's
    # catB was trained without one: the app rendered it when it first listed the cards, and keeps it
    assert previews["catB"] == backend.concepts_dir / "catB.preview.png"
    with Image.open(previews["catB"]) as preview:
        assert "<catb> cat" in preview.text["parameters"] and 'catB: 1' in preview.text["parameters"]


def test_concept_cards_show_full_names_and_skip_other_bases(served, tmp_path, monkeypatch):
    _, backend = served
    info = replace(backend.concept("catB"), name="a-rather-long-concept-name_" * 3, preview=None,
                   base_fingerprint="another")
    assert backend._with_preview(info) is info  # another base: no render, a tile with the name
    image, caption = concept_card(info, backend.fingerprint)
    assert caption.startswith(info.name + ": ") and "other base model" in caption
    monkeypatch.setattr(backend, "render_preview", lambda info: 1 / 0)
    fitting = replace(info, base_fingerprint=backend.fingerprint, path=tmp_path / "x.safetensors")
    assert backend._with_preview(fitting) is fitting  # a failed render leaves the tile (logged, not retried)
    assert fitting.path in backend._no_preview


def test_listing_skips_files_that_are_not_concepts(served, tmp_path):
    _, backend = served
    for suffix in (".safetensors", ".json"):
        shutil.copy(backend.concepts_dir / f"dogA{suffix}", tmp_path / f"dogA{suffix}")
    save_file({"lora_A": torch.zeros(2, 2)}, tmp_path / "some_lora.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    listed = list_concepts(tmp_path)
    assert [(c.name, c.triggers, c.preview) for c in listed] == [("dogA", ("<doga>",), None)]  # preview not copied


def test_generate_with_concepts_composes_live(served):
    client, _ = served
    plain = generate(client)
    gallery, seed, parameters = generate(client, concepts={"dogA": 1.0, "catB": 0.5}, num_images=2)
    assert seed == 7
    assert [Image.open(item["image"]).size for item in gallery] == [(16, 24), (16, 24)]
    assert [item["caption"].split(" · ")[0] for item in gallery] == ["seed 7", "seed 8"]
    assert 'Concepts: "dogA: 1, catB: 0.5"' in parameters
    with Image.open(gallery[0]["image"]) as png:  # the served file keeps the PNG's A1111 metadata
        assert "Seed: 7" in png.text["parameters"]
    composed = pixels((gallery, seed, parameters))
    assert np.abs(composed - pixels(plain)).mean() > 0.5  # the concepts change the image...
    assert np.array_equal(pixels(generate(client)), pixels(plain))  # ...and leave no trace once removed


def test_generation_reports_every_step(served):
    _, backend = served
    steps: list[tuple[int, int]] = []
    settings = GenerationSettings(prompt="a dog", steps=3, scheduler="euler", size=(16, 16))
    backend.generate(settings, {"dogA": 1.0}, on_step=lambda i, n: steps.append((i, n)))
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert "progress_bar" not in vars(backend.pipe)  # the pipeline's own progress bar is back


def test_random_seed_is_reported(served):
    client, _ = served
    _, seed, parameters = generate(client, seed=-1)
    assert 0 <= seed < 2**32
    assert f"Seed: {seed}," in parameters


def test_two_region_generate(served):
    client, _ = served
    rows = [["<dogA> dog", 0, 0, 0.5, 1, ""], ["<catB> cat", 0.5, 0, 1, 1, "blue"]]
    concepts = {"dogA": 1.0, "catB": 1.0}
    gallery, seed, parameters = generate(client, concepts=concepts, width=24, height=16,
                                         regions={"headers": HEADERS, "data": rows}, region_feather=0.1)
    assert Image.open(gallery[0]["image"]).size == (24, 16) and seed == 7
    assert 'Regions: "<doga> dog:0,0,0.5,1 | <catb> cat:0.5,0,1,1"' in parameters
    plain = generate(client, concepts=concepts, width=24, height=16)
    assert not np.array_equal(pixels((gallery, seed, parameters)), pixels(plain))
    assert "Region mode" not in parameters
    latent = generate(client, concepts=concepts, width=24, height=16, regions={"headers": HEADERS, "data": rows},
                      region_feather=0.1, region_mode="latent")
    assert latent[2].endswith("Region mode: latent")
    assert not np.array_equal(pixels(latent), pixels((gallery, seed, parameters)))
    # The default, auto: attention above (12-pixel-wide halves), latent where each half is the native 16x16.
    wide = generate(client, concepts=concepts, width=32, height=16, regions={"headers": HEADERS, "data": rows},
                    region_feather=0.1)
    assert "Size: 32x16," in wide[2] and wide[2].endswith("Region mode: latent")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"concepts": {"nope": 1.0}}, "no concept 'nope'"),
    ({"concepts": {"../dogA": 1.0}}, "invalid concept name '../dogA'"),
    ({"width": 20}, "size 20x24 must be positive multiples of 8"),
    ({"regions": {"headers": HEADERS, "data": [["a dog", 0, 0, 1.5, 1, ""]]}}, "0 &lt;= x0 &lt; x1 &lt;= 1"),
    ({"concepts": {"dogA": "heavy"}}, "the weight of dogA must be a number, got 'heavy'"),
    ({"concepts": {"dogA": 1e6}}, "the weight of dogA must be a finite number between -100 and 100, got 1e"),
    ({"seed": -7}, r"seed must be between 0 and 4294967295 \(or -1 for a random seed\), got -7"),
    ({"num_images": 1.5}, "number of images must be a whole number, got 1.5"),
])
def test_generate_mistakes_are_clear_messages(served, overrides, message):
    client, _ = served
    with pytest.raises(AppError, match=message):
        generate(client, **overrides)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"guidance_scale": float("nan")}, "guidance scale must be a finite number between 0 and 100, got nan"),
    ({"concepts": {"dogA": float("nan")}}, "the weight of dogA must be a finite number between -100 and 100"),
    ({"concepts": {"dogA": float("-inf")}}, "the weight of dogA must be a finite number between -100 and 100"),
    ({"steps": float("nan")}, "steps must be a finite number, got nan"),
    ({"width": float("nan")}, "width must be a finite number, got nan"),
    ({"region_feather": float("nan"), "regions": {"headers": HEADERS, "data": [["a dog", 0, 0, 0.5, 1, ""]]}},
     "region feather must be a finite number of at least 0, got nan"),
])
def test_non_finite_numbers_sent_to_the_api_are_refused(served, overrides, message):
    """gradio_client refuses to send NaN and Infinity; any other HTTP client can, as JSON's NaN / Infinity.

    (Gradio's sliders refuse an infinity themselves, as out of their range; NaN passes their range check.)"""
    client, backend = served
    before = sorted(backend.output_dir.rglob("*.png"))
    args = dict(prompt="a photo of <dogA> dog", negative_prompt="", concepts={}, seed=7, steps=2, guidance_scale=7.0,
                width=16, height=24, scheduler="euler", num_images=1, regions={"headers": HEADERS, "data": []},
                region_feather=0.0)
    url = f"{client.src.rstrip('/')}/gradio_api/call/v2/generate"
    posted = httpx.post(url, content=json.dumps({**args, **overrides}), headers={"content-type": "application/json"})
    events = httpx.get(f"{url}/{posted.json()['event_id']}", timeout=60).text
    assert "event: error" in events and message in events, events
    assert sorted(backend.output_dir.rglob("*.png")) == before


def test_unexpected_failures_show_a_generic_message(served, monkeypatch):
    client, backend = served

    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(backend, "generate", broken)
    with pytest.raises(AppError) as err:
        generate(client)
    assert str(err.value.message) == INTERNAL_ERROR
    assert "secret" not in str(err.value)


def test_server_log_has_the_traceback_of_a_failed_job(capsys):
    """The CLI's log handler (which `spectral-diffusion app` runs under) prints the traceback under the line."""
    logger = logging.getLogger("spectral_diffusion")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(MessageFormat())
    logger.addHandler(handler)
    try:
        with pytest.raises(gr.Error) as shown, user_errors("generate"):
            raise RuntimeError("secret internal detail")
    finally:
        logger.removeHandler(handler)
    assert shown.value.message == INTERNAL_ERROR
    log = capsys.readouterr().err
    assert log.startswith("warning: generate failed\nTraceback (most recent call last):\n")
    assert log.endswith("RuntimeError: secret internal detail\n")


@pytest.mark.parametrize(("content", "name", "message"), [
    (b"just some text", "notes.png", "notes.png: not a readable image"),
    (b"", "empty.png", "empty.png: the file is empty"),
    (b"just some text", "notes.txt", "Invalid file type"),
])
def test_bad_uploads_to_train_are_refused(served, tmp_path, content, name, message):
    client, backend = served
    bad = tmp_path / name
    bad.write_bytes(content)
    with pytest.raises(AppError, match=message):
        client.predict(photos=[handle_file(bad)], concept_name="fromBad", token="<bad1>", class_word="dog",
                       steps=2, rank=4, api_name="/train")
    assert backend.job is None or backend.job.name != "fromBad"


def test_train_refuses_escaping_names_and_taken_tokens(served, tmp_path):
    client, _ = served
    photo = handle_file(write_photos(tmp_path, n=1)[0])
    with pytest.raises(AppError, match="invalid concept name '../evil'"):
        client.predict(photos=[photo], concept_name="../evil", token="<evil>", class_word="dog", steps=2, rank=4,
                       api_name="/train")
    with pytest.raises(AppError, match="token '&lt;dogA&gt;' is already used by concept 'dogA'"):
        client.predict(photos=[photo], concept_name="dog2", token="<dogA>", class_word="dog", steps=2, rank=4,
                       api_name="/train")


def test_training_runs_in_background_and_lists_the_concept(served, tmp_path):
    client, backend = served
    photos = [handle_file(p) for p in write_photos(tmp_path, n=2, seed=1)]
    status = client.predict(photos=photos, concept_name="toyC", token="<toyC>", class_word="toy", steps=2, rank=4,
                            sample_every=1, api_name="/train")
    assert status.startswith("Training toyC")
    assert client.predict(api_name="/train_status") == "Trained toyC: toyC.safetensors is in the concept list."
    assert backend.job.loss_curve()["step"].tolist() == [1, 2]  # the Train tab's loss plot
    assert [(path.parent.name, step) for path, step in backend.job.samples()] == [("toyC_samples", 1),
                                                                                 ("toyC_samples", 2)]
    assert "toyC" in {c["name"] for c in client.predict(api_name="/concepts")}
    _, seed, parameters = generate(client, concepts={"toyC": 1.0}, prompt="a <toyC> toy")
    assert 'Concepts: "toyC: 1"' in parameters
    # a trainer failure is reported with the trainer's own message
    client.predict(photos=photos[:1], concept_name="badTok", token="dog", class_word="toy", steps=2, rank=4,
                   api_name="/train")
    with pytest.raises(AppError, match="Training badTok failed: token 'dog' is already in the tokenizer"):
        client.predict(api_name="/train_status")
    assert not (backend.concepts_dir / "badTok.safetensors").exists()


def test_train_tab_starts_from_the_bases_recipe(served, monkeypatch):
    """The Train tab's sliders start at the loaded base's recipe (`training_defaults.json` beside it), not at SD 1.5's
    defaults; a base without one gets TrainConfig's."""
    _, backend = served
    assert (backend.train_defaults["steps"], backend.train_defaults["rank"]) == (TrainConfig.steps, TrainConfig.rank)
    monkeypatch.setattr(backend, "train_defaults", {**backend.train_defaults, "steps": 800, "rank": 4, "flip": False})
    blocks = {getattr(b, "elem_id", None): b for b in build_app(backend).blocks.values()}
    assert (blocks["train-steps"].value, blocks["train-rank"].value) == (800, 4)
    assert "no flips" in blocks["train-recipe"].value


def test_uploads_show_as_thumbnails(tmp_path):
    photos = write_photos(tmp_path, n=2)
    Image.new("RGB", (400, 100), "red").save(tmp_path / "wide.jpg")
    (tmp_path / "fake.png").write_bytes(b"not an image")
    tiles = thumbnails([*photos, tmp_path / "wide.jpg", tmp_path / "fake.png"], size=64)
    assert [label for _, label in tiles] == ["photo0.png", "photo1.png", "wide.jpg", "fake.png (not an image)"]
    assert tiles[2][0].size == (64, 16) and tiles[2][0].getpixel((10, 8))[0] > 200
    assert thumbnails(None) == []


def test_fuse_and_export(served):
    client, backend = served
    status = client.predict(concepts={"dogA": 1.0, "catB": 0.8}, method="spectral", output_format="diffusers",
                            output_name="duo", density=0.5, api_name="/fuse")
    assert "fused 2 concepts" in status
    assert (backend.output_dir / "models" / "duo" / "model_index.json").is_file()
    with pytest.raises(AppError, match="duo already exists"):
        client.predict(concepts={"dogA": 1.0}, method="spectral", output_format="diffusers", output_name="duo",
                       density=0.5, api_name="/fuse")
    files, message = client.predict(concept="dogA", lora_format="kohya", output_name="dogA_lora",
                                    api_name="/export_lora")
    assert [Path(f).name for f in files] == ["dogA_lora.safetensors", "doga.safetensors"]  # gradio drops <>
    assert (backend.output_dir / "loras" / "dogA_lora.safetensors").is_file()
    assert (backend.output_dir / "loras" / "<doga>.safetensors").is_file()
    assert "use <doga> in prompts" in message


# ---- the pure parts --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "..", "../x", "a/b", "a\\b", ".hidden", "x" * 101, "a..b"])
def test_child_path_refuses_names_that_leave_the_folder(tmp_path, name):
    with pytest.raises(SpectralDiffusionError, match="invalid name"):
        child_path(tmp_path, name)


def test_child_path_accepts_plain_names(tmp_path):
    assert child_path(tmp_path, " dog-A_1.v2 ", ".safetensors") == tmp_path.resolve() / "dog-A_1.v2.safetensors"


def test_region_rows():
    rows = [["a dog", "0", 0, 0.5, 1.0, ""], [None, None, None, None, None, None], ["a cat", 0.5, 0, 1, 1, "red"]]
    regions = rows_to_regions(rows, feather=0.1)
    assert [(r.prompt, r.box, r.negative, r.feather) for r in regions] == [
        ("a dog", (0.0, 0.0, 0.5, 1.0), None, 0.1), ("a cat", (0.5, 0.0, 1.0, 1.0), "red", 0.1)]
    with pytest.raises(SpectralDiffusionError, match="region row 1: enter a prompt"):
        rows_to_regions([["", 0, 0, 1, 1, ""]])
    with pytest.raises(SpectralDiffusionError, match="region row 1: x1 must be a number"):
        rows_to_regions([["a dog", 0, 0, "wide", 1, ""]])


@pytest.mark.parametrize(("layout", "size", "native", "canvas"), [
    ("Left | right", (64, 64), (64, 64), (128, 64)),  # the toy model: each half its native 64x64
    ("Top | bottom", (64, 64), (64, 64), (64, 128)),
    ("Thirds", (64, 64), (64, 64), (192, 64)),
    ("Left | right", (256, 32), (64, 64), (256, 64)),  # grown where needed, never shrunk
    ("Left | right", (512, 512), (512, 512), (1024, 512)),  # SD 1.5
    ("Thirds", (512, 512), (512, 512), (1024, 512)),  # within the sliders' 1024
])
def test_a_layout_grows_the_canvas_to_fit_its_boxes(layout, size, native, canvas):
    assert layout_canvas(layout, size, native, 8, (1024, 1024)) == canvas
    regions = rows_to_regions(layout_rows(layout, ["a dog", "a cat", "a fish"]))
    expected = "latent" if layout != "Thirds" or native == (64, 64) else "attention"
    assert resolve_region_mode("auto", regions, canvas, native) == expected
