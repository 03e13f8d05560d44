"""README's command lines, run as printed on the tiny model (fewer steps), and its train flags = the toy recipe."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from PIL import Image

from spectral_diffusion.cli import main
from spectral_diffusion.toyworld.recipe import RECIPE

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[list[str]]:
    """Every `spectral-diffusion ...` line of README's "Using it" block, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Using it\s+```bash\n(.*?)```", text, flags=re.S).group(1)
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [line.split(" > ")[0] for line in joined.splitlines() if line.startswith("spectral-diffusion ")]
    return [shlex.split(line)[1:] for line in lines]


def png_parameters(path: Path) -> str:
    with Image.open(path) as image:
        return image.text["parameters"]


def test_readme_trains_with_the_toy_recipe() -> None:
    """README's train lines leave every recipe setting to the toy base's training_defaults.json (the recipe)."""
    trains = [args for args in readme_commands() if args[0] == "train"]
    assert trains
    recipe_flags = {flag for flag in RECIPE.cli_flags() if flag.startswith("--")}
    for args in trains:
        assert not recipe_flags & set(args), args


def test_readme_commands_run_on_the_tiny_model(tiny_model_dir, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPECTRAL_DIFFUSION_CACHE", str(tmp_path / "cache"))
    (tmp_path / "concepts").symlink_to(ROOT / "concepts")
    ran = []
    for args in readme_commands():
        if args[0] == "app":  # starts a server; tests/test_app.py covers it
            continue
        if args[0] == "toyworld":  # prints to stdout, which README redirects into a file
            capsys.readouterr()
            assert main(args) == 0
            (tmp_path / "captions.txt").write_text(capsys.readouterr().out)
            ran.append(args[0])
            continue
        args = [("2" if previous == "--steps" else arg) for previous, arg in zip([""] + args[:-1], args, strict=True)]
        if args[0] in ("train", "fuse") or "--concepts" in args:
            args += ["--base", str(tiny_model_dir)]
        if args[0] == "train":
            args += ["--preview-images", "0", "--steps", "2", "--rank", "4", "--targets", "kv"]
        assert main(args) == 0, args
        ran.append(args[0])
    assert ran == ["train", "train", "toyworld", "fuse", "generate", "generate", "export-lora", "export-lora", "generate"]
    assert len((tmp_path / "captions.txt").read_text().splitlines()) == 64
    images = sorted((tmp_path / "images").glob("*.png"))
    assert len(images) == 4 + 1 + 1  # regions (--n 4), live concepts, + a LoRA
    regional = [text for text in (png_parameters(path) for path in images) if "Regions:" in text]
    assert len(regional) == 4
    for text in regional:  # step 3 as its comment says: auto canvas, two native windows (the tiny model's is 16x16)
        assert "Size: 32x16," in text and text.endswith("Region mode: latent"), text
    assert (tmp_path / "loras" / "<housea>.safetensors").is_file()  # the exported LoRA's embedding, by its trigger
    assert (tmp_path / "fused-model" / "model_index.json").is_file()


def test_readme_python_api_runs_on_the_tiny_model(tiny_model_dir, tmp_path, monkeypatch, capsys) -> None:
    """README's "Python API" block as printed, on the tiny model with 2 training steps."""
    text = (ROOT / "README.md").read_text()
    code = re.search(r"## Python API\s+```python\n(.*?)```", text, flags=re.S).group(1)
    for old, new in (('load_base("toy")', f"load_base({str(tiny_model_dir)!r})"), ("steps=800", "steps=2")):
        assert old in code
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPECTRAL_DIFFUSION_CACHE", str(tmp_path / "cache"))
    (tmp_path / "concepts").symlink_to(ROOT / "concepts")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert capsys.readouterr().out.startswith("(16, 16) a photo of <fisha> fish\nSteps: 20, ")
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["00000-1.png", "00001-2.png"]
    assert namespace["report"].method == "spectral" and namespace["report"].weights == [0.8]
    assert (tmp_path / "trained" / "fishA.safetensors").is_file()
