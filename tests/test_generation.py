"""Generation: determinism, seeds per image, schedulers, A1111 PNG metadata, file naming, the `generate` CLI."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from spectral_diffusion.cli import main
from spectral_diffusion.concept_file import save_concept
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.generation import (
    GeneratedImage,
    GenerationSettings,
    generate,
    infotext,
    make_scheduler,
    native_size,
    parse_size,
    save_images,
)
from spectral_diffusion.regional import Region
from spectral_diffusion.testing.tiny_sd import random_concept


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_same_seed_same_image_and_one_seed_per_image(tiny_pipe) -> None:
    settings = GenerationSettings("a photo of a dog", steps=2, seed=5, n=2, scheduler="euler_a")
    first = generate(tiny_pipe, settings)
    again = generate(tiny_pipe, settings)
    assert [g.seed for g in first] == [5, 6]
    assert all(np.array_equal(_pixels(a.image), _pixels(b.image)) for a, b in zip(first, again, strict=True))
    alone = generate(tiny_pipe, GenerationSettings("a photo of a dog", steps=2, seed=6, scheduler="euler_a"))
    assert np.abs(_pixels(alone[0].image) - _pixels(first[1].image)).max() <= 1
    assert not np.array_equal(_pixels(first[0].image), _pixels(first[1].image))


def test_size_scheduler_and_pipeline_restored(tiny_pipe) -> None:
    scheduler = tiny_pipe.scheduler
    [native] = generate(tiny_pipe, GenerationSettings("a dog", steps=1, scheduler="ddim"))
    assert native.image.size == native_size(tiny_pipe) == (16, 16)
    [wide] = generate(tiny_pipe, GenerationSettings("a dog", steps=1, size=(24, 16)))
    assert wide.image.size == (24, 16)
    assert tiny_pipe.scheduler is scheduler
    with pytest.raises(SpectralDiffusionError, match="multiples of 8"):
        generate(tiny_pipe, GenerationSettings("a dog", steps=1, size=(15, 16)))


def test_every_scheduler_builds_from_the_pipeline_config(tiny_pipe) -> None:
    from spectral_diffusion.generation import SCHEDULERS

    for name, (cls, _, _) in SCHEDULERS.items():
        scheduler = make_scheduler(name, tiny_pipe.scheduler.config)
        assert isinstance(scheduler, cls)
        assert scheduler.config.beta_schedule == tiny_pipe.scheduler.config.beta_schedule
    with pytest.raises(SpectralDiffusionError, match="unknown scheduler 'lms'"):
        GenerationSettings("a dog", scheduler="lms")


def test_parse_size() -> None:
    assert parse_size("512x768") == (512, 768)
    with pytest.raises(SpectralDiffusionError, match="WIDTHxHEIGHT"):
        parse_size("512")


def test_a1111_parameters_text(tiny_pipe) -> None:
    settings = GenerationSettings("a <dogA> dog", negative="blurry", steps=3, guidance=7.5, scheduler="dpm++", seed=9,
                                  regions=(Region("a red cat", (0.0, 0.0, 0.5, 1.0), negative="blue"),))
    [image] = generate(tiny_pipe, settings, model="toy", concepts={"dogA.safetensors": 1.0, "catB.safetensors": 0.8})
    assert image.parameters == (
        "a <dogA> dog\n"
        "Negative prompt: blurry\n"
        'Steps: 3, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 9, Size: 16x16, Model: toy, '
        'Concepts: "dogA.safetensors: 1, catB.safetensors: 0.8", Regions: "a red cat:0,0,0.5,1", '
        "Region negative prompts: blue")


def test_save_images_numbers_files_and_never_overwrites(tmp_path) -> None:
    image = Image.new("RGB", (4, 4), "red")
    (tmp_path / "00007-1.png").write_bytes(b"not mine")
    items = [GeneratedImage(image, 3, "p\nSteps: 1"), GeneratedImage(image, 4, "q\nSteps: 1")]
    first = save_images(items, tmp_path)
    second = save_images(items[:1], tmp_path)
    assert [p.name for p in first + second] == ["00008-3.png", "00009-4.png", "00010-3.png"]
    assert (tmp_path / "00007-1.png").read_bytes() == b"not mine"
    with Image.open(first[1]) as png:
        assert png.text["parameters"] == "q\nSteps: 1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00007-1.png", "00008-3.png", "00009-4.png",
                                                          "00010-3.png"]


def test_cli_generate_fused_and_live_give_the_same_image(tmp_path, tiny_model_dir, tiny_pipe, capsys) -> None:
    concepts = [random_concept(tiny_pipe, band=0, token="<dogA>", seed=1),
                random_concept(tiny_pipe, variant="rotational", band=1, token="<catB>", seed=2)]
    paths = [str(save_concept(tmp_path / f"c{i}.safetensors", c)) for i, c in enumerate(concepts)]
    common = ["--prompt", "a photo of <dogA> and <catB>", "--steps", "2", "--seed", "3", "--device", "cpu",
              "--region", "<dogA>:0,0,0.5,1", "--region", "<catB> in the snow:0.5,0,1,1", "--feather", "0.1"]
    assert main(["fuse", *paths, "--weights", "1,0.5", "--base", str(tiny_model_dir), "--device", "cpu",
                 "--out", str(tmp_path / "fused")]) == 0
    assert main(["generate", *common, "--model", str(tmp_path / "fused"), "--out", str(tmp_path / "a")]) == 0
    assert main(["generate", *common, "--base", str(tiny_model_dir), "--concepts", *paths, "--weights", "1,0.5",
                 "--out", str(tmp_path / "b")]) == 0
    assert main(["generate", *common, "--base", str(tiny_model_dir), "--out", str(tmp_path / "c")]) == 0
    [fused], [live], [plain] = (list((tmp_path / d).glob("*.png")) for d in "abc")
    assert "wrote" in capsys.readouterr().out
    with Image.open(fused) as a, Image.open(live) as b, Image.open(plain) as c:
        assert np.abs(_pixels(a) - _pixels(b)).max() <= 1
        assert np.abs(_pixels(a) - _pixels(c)).max() > 1
        assert "Model: fused, Concepts: \"c0.safetensors: 1, c1.safetensors: 0.5\"" in a.text["parameters"]
        assert "Concepts: \"c0.safetensors: 1, c1.safetensors: 0.5\"" in b.text["parameters"]
        assert 'Regions: "<dogA>:0,0,0.5,1 | <catB> in the snow:0.5,0,1,1", Region feather: "0.1, 0.1"' \
            in b.text["parameters"]


def test_cli_generate_errors(tmp_path, tiny_model_dir, capsys) -> None:
    base = ["--prompt", "a dog", "--base", str(tiny_model_dir), "--device", "cpu", "--out", str(tmp_path)]
    assert main(["generate", *base, "--region", "a cat:0,0,2,1"]) == 2
    assert "0 <= x0 < x1 <= 1" in capsys.readouterr().err
    assert main(["generate", *base, "--region-negative", "blue"]) == 2
    assert "1 --region-negative given for 0 --region" in capsys.readouterr().err
    assert main(["generate", *base, "--model", str(tiny_model_dir), "--concepts", "x.safetensors"]) == 2
    assert "use --base, not --model" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_region_mode_setting_and_metadata() -> None:
    regions = (Region("a red cat", (0.0, 0.0, 0.5, 1.0)),)
    latent = GenerationSettings("a dog", regions=regions, region_mode="latent")
    assert infotext(latent, 1, (32, 16), "toy", {}).endswith('Regions: "a red cat:0,0,0.5,1", Region mode: latent')
    assert "Region mode" not in infotext(GenerationSettings("a dog", regions=regions), 1, (32, 16), "toy", {})
    with pytest.raises(SpectralDiffusionError, match="unknown region mode 'tiles'; choose one of attention, latent"):
        GenerationSettings("a dog", region_mode="tiles")


def test_cli_generate_region_mode(tmp_path, tiny_model_dir, capsys) -> None:
    base = ["--prompt", "a dog", "--base", str(tiny_model_dir), "--device", "cpu", "--steps", "1", "--size", "32x16",
            "--region", "a red cat:0,0,0.5,1", "--region", "a green toy:0.5,0,1,1"]
    with pytest.raises(SystemExit) as exc:
        main(["generate", *base, "--region-mode", "bogus", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err
    assert main(["generate", *base, "--region-mode", "latent", "--out", str(tmp_path / "a")]) == 0
    assert main(["generate", *base, "--out", str(tmp_path / "b")]) == 0
    [latent], [attention] = (list((tmp_path / d).glob("*.png")) for d in "ab")
    with Image.open(latent) as a, Image.open(attention) as b:
        assert a.text["parameters"].endswith("Region mode: latent")
        assert "Region mode" not in b.text["parameters"]
        assert not np.array_equal(_pixels(a), _pixels(b))
