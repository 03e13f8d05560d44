"""The demo end to end on the tiny model (1 training step, 1 seed), and the fusion benchmark's table builders."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from spectral_diffusion.cli import main
from spectral_diffusion.concept_file import load_concept, read_meta, save_concept
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.toyworld import judge as judge_module
from spectral_diffusion.toyworld.demo import DemoConfig, run_demo
from spectral_diffusion.toyworld.judge import Judge, JudgeNet
from spectral_diffusion.toyworld.recipe import RECIPE
from spectral_diffusion.toyworld.scoring import concept_token, halves, retention

CONCEPTS = ("striped_fish", "bullseye")


def _load_benchmark():
    """benchmarks/ is not a package: import the script by path (registered, as its dataclasses need)."""
    if "fusion_quality" not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "benchmarks" / "fusion_quality.py"
        spec = importlib.util.spec_from_file_location("fusion_quality", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["fusion_quality"] = module
        spec.loader.exec_module(module)
    return sys.modules["fusion_quality"]


@pytest.fixture
def random_judge() -> Judge:
    torch.manual_seed(0)
    return Judge(JudgeNet())


def test_demo_writes_grid_images_scores_and_reuses_concepts(tiny_model_dir, tmp_path, monkeypatch, capsys,
                                                            random_judge):
    monkeypatch.setenv("SPECTRAL_DIFFUSION_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    config = DemoConfig(out=out, base=str(tiny_model_dir), device="cpu", concepts=CONCEPTS, steps=1, seeds=1,
                        sample_steps=2)
    logs: list[str] = []
    result = run_demo(config, judge=random_judge, log=logs.append)

    files = {name: out / "concepts" / f"{name}.safetensors" for name in CONCEPTS}
    assert [read_meta(files[name]).band for name in CONCEPTS] == [0, 1]
    assert read_meta(files["bullseye"]).targets == RECIPE.targets  # the one toy recipe
    assert any("fused 2 concepts" in line for line in logs)
    side = 16  # the tiny model's native size
    images = sorted((out / "images").glob("*.png"))
    # per concept: own prompt + new background, with its own model and fused; one left | right pair, fused and live
    assert len(images) == 2 * 2 * 2 + 2
    with Image.open(out / "images" / "regions-live-striped_fish+bullseye-1000.png") as img:
        assert "Model: " in img.text["parameters"] and "+live" in img.text["parameters"]
    with Image.open(out / "images" / "regions-striped_fish+bullseye-1000.png") as img:
        assert img.size == (2 * side, side)
        assert concept_token("striped_fish") in img.text["parameters"]
        assert "Regions: " in img.text["parameters"] and "Region mode: latent" in img.text["parameters"]
    with Image.open(out / "images" / "fused-bullseye-new-background-1000.png") as img:
        assert img.text["parameters"].startswith("a photo of <bullseye> circle on a dotted background")
    with Image.open(result.grid) as grid:
        assert grid.format == "PNG" and grid.width > 4 * 128
    scores = json.loads((out / "scores.json").read_text())
    for name in CONCEPTS:
        entry = scores["concepts"][name]
        assert 0 <= entry["fused"]["identity"] <= 1
        assert entry["retention"] == pytest.approx(entry["fused"]["identity"] / entry["single"]["identity"])
    assert scores["regional"][0]["left"] == "striped_fish"
    assert [r["scoped"] for r in scores["regional"]] == [False, True]

    stamps = {name: path.stat().st_mtime_ns for name, path in files.items()}
    monkeypatch.setattr(judge_module.Judge, "load", classmethod(lambda cls, path=None: random_judge))
    code = main(["demo", "--out", str(out), "--base", str(tiny_model_dir), "--device", "cpu", "--steps", "1",
                 "--seeds", "1", "--concepts", *CONCEPTS])
    printed = capsys.readouterr()
    assert code == 0
    assert {name: path.stat().st_mtime_ns for name, path in files.items()} == stamps  # reused, not retrained
    assert "identity fused" in printed.out and "striped_fish" in printed.out and "regions striped_fish" in printed.out

    code = main(["demo", "--out", str(out), "--base", str(tiny_model_dir), "--device", "cpu", "--steps", "2",
                 "--seeds", "1", "--concepts", *CONCEPTS])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines()[-1].startswith("error: ") and "steps 1 -> 2" in err and "--overwrite" in err

    concept = load_concept(files["bullseye"])  # a file trained before the empty prompt joined the locality term
    del concept.meta.training["locality_prompts"]
    concept.meta.training["locality_captions"] = [f"a caption {i}" for i in range(64)]  # and with --locality-captions
    save_concept(files["bullseye"], concept, overwrite=True)
    code = main(["demo", "--out", str(out), "--base", str(tiny_model_dir), "--device", "cpu", "--steps", "1",
                 "--seeds", "1", "--concepts", *CONCEPTS])
    err = capsys.readouterr().err
    assert code == 2
    assert ("locality_prompts None -> ['token dropped', 'empty prompt', 'foreign token']" in err
            and "locality_captions 64 captions -> None" in err and "--overwrite" in err)


@pytest.mark.parametrize(("changes", "message"), [
    ({"concepts": ("striped_fish",)}, "at least two concepts"),
    ({"concepts": ("striped_fish", "unicorn")}, "unknown toy concept 'unicorn'"),
    ({"concepts": ("bullseye", "bullseye")}, "concepts must differ"),
    ({"new_background": "gray"}, "is in the photos"),
    ({"seeds": 0}, "must be >= 1"),
])
def test_demo_refuses_bad_settings(changes, message):
    with pytest.raises(SpectralDiffusionError, match=message):
        DemoConfig(**changes).check()


def test_halves_and_retention():
    image = Image.new("RGB", (32, 16))
    image.paste((255, 0, 0), (16, 0, 32, 16))
    left, right = halves(image)
    assert left.size == right.size == (16, 16)
    assert left.getpixel((15, 0)) == (0, 0, 0) and right.getpixel((0, 0)) == (255, 0, 0)
    assert retention(0.45, 0.9) == pytest.approx(0.5)
    assert math.isnan(retention(0.3, 0.0))


def test_matched_ranks_pick_the_closest_budget():
    bench = _load_benchmark()
    sides = {"additive": 2 * 64 + 1, "lora": 2 * 64, "ortho": 64}  # per-rank parameters of one 64x64 layer

    def count(kind: str, rank: int) -> int:
        return rank * rank if kind == "rotational" else rank * sides[kind]

    limits = {"additive": 8, "rotational": 8, "lora": 64, "ortho": 64}
    ranks = bench.matched_ranks(count, ("additive", "rotational", "lora", "ortho"), ("additive", 4), limits)
    assert ranks == {"additive": 4, "rotational": 8, "lora": 4, "ortho": 8}  # rotational: capped by its limit


def test_trainable_count_matches_the_adapter_shapes(tiny_pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTRAL_DIFFUSION_CACHE", str(tmp_path))
    bench = _load_benchmark()
    shapes = [bench.weight_matrix(bench.unwrap(m)).shape
              for m in bench.find_targets(tiny_pipe.unet, tiny_pipe.text_encoder, RECIPE.targets).values()]
    assert bench.trainable_count(tiny_pipe, "lora", 3) == sum(3 * (o + i) for o, i in shapes)
    assert bench.trainable_count(tiny_pipe, "additive", 2) == sum(2 * (o + i + 1) for o, i in shapes)
    assert bench.trainable_count(tiny_pipe, "rotational", 4) == len(shapes) * (2 * 6 + 4)
    assert bench.max_rank(tiny_pipe, "additive", 8) == min(min(s) for s in shapes) // 8


def test_summary_rows_table_and_results_file(tmp_path):
    bench = _load_benchmark()
    single = {"concepts": {"a": {"identity": 0.8, "fidelity": 0.5}, "b": {"identity": 0.4, "fidelity": 0.7}}}
    fused = {"concepts": {"a": {"identity": 0.6, "fidelity": 0.4}, "b": {"identity": 0.3, "fidelity": 0.6}},
             "regional": [{"mode": "attention", "success": 0.25}, {"mode": "latent", "success": 0.5},
                          {"mode": "latent", "success": 1.0}], "fuse_seconds": 0.5}
    row = bench.summarise(2, "additive", "spectral", single, fused)
    assert row.single_identity == pytest.approx(0.6) and row.fused_identity == pytest.approx(0.45)
    assert row.retention == pytest.approx(0.75) and row.regional == {"attention": 0.25, "latent": 0.75}
    assert bench.regional_pairs(1) == [] and bench.regional_pairs(2) == [(0, 1)]
    assert bench.regional_pairs(8) == [(0, 1), (2, 3)]
    table = bench.markdown_table([row])
    assert table.splitlines()[2] == "| 2 | additive | spectral | 0.60 | 0.45 | 0.75 | 0.60 | 0.50 | 0.25 | 0.75 | 0.5 |"

    doc = tmp_path / "results.md"
    bench.write_results(doc, "first")
    doc.write_text(doc.read_text() + "\n## Discussion\nkept\n")
    bench.write_results(doc, "second")
    text = doc.read_text()
    assert "second" in text and "first" not in text and text.endswith("## Discussion\nkept\n")
