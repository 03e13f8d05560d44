"""Generation: determinism, seeds per image, schedulers, A1111 PNG metadata, file naming, the `generate` CLI."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from spectral_diffusion.cli import main
from spectral_diffusion.concept_file import save_concept
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.generation import (
    MAX_SEED,
    GenerationSettings,
    check_canvas,
    generate,
    infotext,
    make_scheduler,
    native_size,
    parse_size,
    resolve_seed,
    resolve_settings,
    save_images,
    save_png,
)
from spectral_diffusion.regional import Region
from spectral_diffusion.testing.images import png_header
from spectral_diffusion.testing.tiny_sd import random_concept


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_same_seed_same_image_and_one_seed_per_image(tiny_pipe) -> None:
    settings = GenerationSettings("a photo of a dog", steps=2, seed=5, n=2, scheduler="euler_a")
    first = generate(tiny_pipe, settings)
    again = generate(tiny_pipe, settings)
    assert [g.info["seed"] for g in first] == [5, 6]
    assert all(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(first, again, strict=True))
    alone = generate(tiny_pipe, GenerationSettings("a photo of a dog", steps=2, seed=6, scheduler="euler_a"))
    assert np.abs(_pixels(alone[0]) - _pixels(first[1])).max() <= 1
    assert not np.array_equal(_pixels(first[0]), _pixels(first[1]))


def test_size_scheduler_and_pipeline_restored(tiny_pipe) -> None:
    scheduler = tiny_pipe.scheduler
    [native] = generate(tiny_pipe, GenerationSettings("a dog", steps=1, scheduler="ddim"))
    assert native.size == native_size(tiny_pipe) == (16, 16)
    [wide] = generate(tiny_pipe, GenerationSettings("a dog", steps=1, size=(24, 16)))
    assert wide.size == (24, 16)
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
                                  size=(16, 16), regions=(Region("a red cat", (0.0, 0.0, 0.5, 1.0), negative="blue"),))
    [image] = generate(tiny_pipe, settings, model="toy", concepts={"dogA.safetensors": 1.0, "catB.safetensors": 0.8})
    assert isinstance(image, Image.Image) and image.info["seed"] == 9
    assert image.info["parameters"] == (
        "a <dogA> dog\n"
        "Negative prompt: blurry\n"
        'Steps: 3, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 9, Size: 16x16, Model: toy, '
        'Concepts: "dogA.safetensors: 1, catB.safetensors: 0.8", Regions: "a red cat:0,0,0.5,1", '
        "Region negative prompts: blue")


def test_saving_an_image_without_generation_metadata_is_one_clear_error(tmp_path) -> None:
    plain = Image.new("RGB", (4, 4), "red")
    with pytest.raises(SpectralDiffusionError, match=r"no info\['parameters'\] \(generate sets it\)"):
        save_images([plain], tmp_path)
    with pytest.raises(SpectralDiffusionError, match=r"no info\['parameters'\]"):
        save_png(tmp_path / "x.png", plain)
    assert save_png(tmp_path / "x.png", plain, "given\nSteps: 1").is_file()
    assert not list(tmp_path.glob("0*.png"))


def test_save_images_numbers_files_and_never_overwrites(tmp_path) -> None:
    image = Image.new("RGB", (4, 4), "red")
    (tmp_path / "00007-1.png").write_bytes(b"not mine")
    items = [image.copy(), image.copy()]
    for item, seed, parameters in zip(items, (3, 4), ("p\nSteps: 1", "q\nSteps: 1"), strict=True):
        item.info.update(seed=seed, parameters=parameters)
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
              "--region", "<dogA>:0,0,0.5,1", "--region", "<catB> in the snow:0.5,0,1,1", "--feather", "0.1",
              "--region-mode", "attention"]
    assert main(["fuse", *paths, "--weights", "1,0.5", "--base", str(tiny_model_dir), "--device", "cpu",
                 "--method", "spectral", "--out", str(tmp_path / "fused")]) == 0
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
        assert 'Regions: "<doga>:0,0,0.5,1 | <catb> in the snow:0.5,0,1,1", Region feather: "0.1, 0.1"' \
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
    assert GenerationSettings("a dog").region_mode == "auto" and GenerationSettings("a dog").size is None
    latent = GenerationSettings("a dog", regions=regions, region_mode="latent")
    assert infotext(latent, 1, (32, 16), "toy", {}).endswith('Regions: "a red cat:0,0,0.5,1", Region mode: latent')
    attention = GenerationSettings("a dog", regions=regions, region_mode="attention")
    assert "Region mode" not in infotext(attention, 1, (32, 16), "toy", {})  # as older metadata had it
    with pytest.raises(SpectralDiffusionError, match="unknown region mode 'tiles'; choose one of auto, attention, "
                                                     "latent"):
        GenerationSettings("a dog", region_mode="tiles")


def test_auto_canvas_and_region_mode_are_resolved_recorded_and_reproduce(tiny_pipe) -> None:
    # The tiny model's native size is 16x16: two half-width regions get a 32x16 canvas, each a native-size window.
    halves = (Region("a red cat", (0.0, 0.0, 0.5, 1.0)), Region("a green toy", (0.5, 0.0, 1.0, 1.0)))
    auto = GenerationSettings("a dog", steps=1, seed=4, regions=halves)
    assert resolve_settings(tiny_pipe, auto) == replace(auto, size=(32, 16), region_mode="latent")
    assert resolve_settings(tiny_pipe, replace(auto, size=(16, 16))).region_mode == "attention"
    assert resolve_settings(tiny_pipe, GenerationSettings("a dog")).size == (16, 16)  # no regions: native
    [image] = generate(tiny_pipe, auto)
    assert image.size == (32, 16)
    assert "Size: 32x16," in image.info["parameters"] and image.info["parameters"].endswith("Region mode: latent")
    [again] = generate(tiny_pipe, replace(auto, size=(32, 16), region_mode="latent"))  # from the metadata
    assert again.info == image.info and np.array_equal(_pixels(again), _pixels(image))
    [shared] = generate(tiny_pipe, replace(auto, size=(32, 16), region_mode="attention"))
    assert not np.array_equal(_pixels(shared), _pixels(image))
    narrow = (Region("a red cat", (0.0, 0.0, 0.01, 1.0)),)
    with pytest.raises(SpectralDiffusionError, match=r"^size 1552x16 \(the smallest canvas on which every region "
                                                     r"spans the model's native 16x16\) is 24832 pixels, over the "
                                                     r"limit of 24831 \(raise it with --max-pixels"):
        resolve_settings(tiny_pipe, GenerationSettings("a dog", regions=narrow), max_pixels=24831)


def test_cli_generate_region_mode(tmp_path, tiny_model_dir, capsys) -> None:
    base = ["--prompt", "a dog", "--base", str(tiny_model_dir), "--device", "cpu", "--steps", "1",
            "--region", "a red cat:0,0,0.5,1", "--region", "a green toy:0.5,0,1,1"]
    with pytest.raises(SystemExit) as exc:
        main(["generate", *base, "--region-mode", "bogus", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err
    assert main(["generate", *base, "--size", "32x16", "--region-mode", "latent", "--out", str(tmp_path / "a")]) == 0
    assert main(["generate", *base, "--size", "32x16", "--region-mode", "attention",
                 "--out", str(tmp_path / "b")]) == 0
    assert "canvas 32x16, region mode attention\n" in capsys.readouterr().out
    assert main(["generate", *base, "--out", str(tmp_path / "c")]) == 0  # auto canvas and mode
    assert "canvas 32x16, region mode latent\n" in capsys.readouterr().out
    assert main(["generate", *base, "--size", "16x16", "--out", str(tmp_path / "d")]) == 0  # regions under native
    assert "canvas 16x16, region mode attention\n" in capsys.readouterr().out
    [latent], [attention], [auto], [small] = (list((tmp_path / d).glob("*.png")) for d in "abcd")
    with Image.open(latent) as a, Image.open(attention) as b, Image.open(auto) as c, Image.open(small) as d:
        assert a.text["parameters"].endswith("Region mode: latent")
        assert "Region mode" not in b.text["parameters"] and "Region mode" not in d.text["parameters"]
        assert not np.array_equal(_pixels(a), _pixels(b))
        assert c.text["parameters"] == a.text["parameters"] and np.array_equal(_pixels(a), _pixels(c))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"guidance": float("nan")}, "guidance scale must be a finite number between 0 and 100, got nan"),
    ({"guidance": float("inf")}, "guidance scale must be a finite number between 0 and 100, got inf"),
    ({"guidance": 1e3}, "guidance scale must be a finite number between 0 and 100, got 1000"),
    ({"seed": -5}, r"seed must be between 0 and 4294967295 \(or -1 for a random seed\), got -5"),
    ({"seed": 18446744073709551615}, "seed must be between 0 and 4294967295"),
])
def test_settings_refuse_non_finite_and_out_of_range_numbers(kwargs, message) -> None:
    with pytest.raises(SpectralDiffusionError, match=message):
        GenerationSettings("a dog", **kwargs)


def test_seed_minus_one_draws_a_random_seed_for_the_cli_and_the_app_alike() -> None:
    drawn = {resolve_seed(-1) for _ in range(4)} | {resolve_seed(None)}
    assert len(drawn) > 1 and all(0 <= s <= MAX_SEED for s in drawn)
    assert resolve_seed(5) == 5 and resolve_seed(-2) == -2  # refused by GenerationSettings, as above


def test_canvas_is_bounded(tiny_pipe) -> None:
    check_canvas(1024, 1024)
    with pytest.raises(SpectralDiffusionError, match="size 100000x16 is 1600000 pixels, over the limit of 1048576"):
        check_canvas(100000, 16)
    with pytest.raises(SpectralDiffusionError, match="over the limit of 255 .*--max-pixels"):
        generate(tiny_pipe, GenerationSettings("a dog", steps=1), max_pixels=255)  # native 16x16 = 256 pixels
    [image] = generate(tiny_pipe, GenerationSettings("a dog", steps=1), max_pixels=256)
    assert image.size == (16, 16)


def test_the_canvas_is_checked_before_a_model_loads() -> None:
    GenerationSettings("a dog").check_size(1)  # no size: the model decides it later
    with pytest.raises(SpectralDiffusionError) as info:
        GenerationSettings("a dog").check_size(0)
    assert str(info.value) == "--max-pixels must be >= 1, got 0"
    with pytest.raises(SpectralDiffusionError, match=r"^size 32x32 is 1024 pixels, over the limit of 1000 "):
        GenerationSettings("a dog", size=(32, 32)).check_size(1000)


@pytest.mark.parametrize(("args", "message"), [
    (["--concepts", "x.safetensors", "--weights", "nan"], "the weight of x.safetensors must be a finite number"),
    (["--concepts", "x.safetensors", "--weights", "inf"], "the weight of x.safetensors must be a finite number"),
    (["--concepts", "x.safetensors", "--weights", "1e309"], "got inf"),
    (["--guidance", "nan"], "guidance scale must be a finite number between 0 and 100, got nan"),
    (["--guidance=-inf"], "guidance scale must be a finite number between 0 and 100, got -inf"),
    (["--seed", "18446744073709551615"], "seed must be between 0 and 4294967295"),
    (["--seed", "-2"], r"seed must be between 0 and 4294967295 \(or -1 for a random seed\), got -2"),
    (["--size", "100000x16"], "size 100000x16 is 1600000 pixels, over the limit of 1048576"),
    (["--size", "32x32", "--max-pixels", "1000"], "size 32x32 is 1024 pixels, over the limit of 1000"),
    (["--max-pixels", "0"], "--max-pixels must be >= 1, got 0"),
    (["--region", "a cat:{tmp}/notes.txt"], r"region 'a cat': .*notes.txt is not a readable image"),
    (["--region", "a cat:{tmp}/bomb.png"], r"region 'a cat': .*bomb.png is not a readable image"),
    (["--region", "a cat:{tmp}/large.png"], r"mask image .*large.png is 9000x8000, more than 67108864 pixels"),
    (["--out", "{tmp}/notes.txt"], r"cannot write to .*notes.txt: .*notes.txt is a file, not a folder"),
    (["--out", "{tmp}/notes.txt/images"], r"notes.txt is a file, not a folder"),
])
def test_cli_generate_refuses_bad_numbers_and_files_before_loading_the_model(tmp_path, capsys, args,
                                                                              message) -> None:
    (tmp_path / "notes.txt").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (tmp_path / "bomb.png").write_bytes(png_header(100_000, 100_000))  # PIL's own bomb limit
    (tmp_path / "large.png").write_bytes(png_header(9000, 8000))  # under PIL's limit, over ours
    before = sorted(tmp_path.iterdir())
    base = ["--prompt", "a dog", "--base", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "out")]
    assert main(["generate", *base, *(a.format(tmp=tmp_path) for a in args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err), err
    assert sorted(tmp_path.iterdir()) == before and (tmp_path / "notes.txt").read_text().startswith("root")


def test_cli_generate_seed_minus_one_and_raised_canvas(tmp_path, tiny_model_dir, capsys) -> None:
    base = ["--prompt", "a dog", "--base", str(tiny_model_dir), "--device", "cpu", "--steps", "1"]
    assert main(["generate", *base, "--seed", "-1", "--out", str(tmp_path / "a")]) == 0
    [png] = (tmp_path / "a").iterdir()
    assert re.fullmatch(r"00000-\d+\.png", png.name) and 0 <= int(png.stem.split("-")[1]) <= MAX_SEED
    with Image.open(png) as image:
        assert f"Seed: {png.stem.split('-')[1]}," in image.text["parameters"]
    assert main(["generate", *base, "--size", "24x16", "--max-pixels", "384", "--out", str(tmp_path / "b")]) == 0
    [wide] = (tmp_path / "b").iterdir()
    assert Image.open(wide).size == (24, 16)
