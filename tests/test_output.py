"""What commands print and write: plain progress lines in a log, a loss CSV, library bars silenced, and every file
written with the usual permissions (umask applies)."""

from __future__ import annotations

import csv
import io
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from spectral_diffusion.cli import main
from spectral_diffusion.progress import StepProgress

PHOTOS = Path(__file__).parent / "data" / "photos"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_a_logged_training_is_a_few_plain_lines_and_files_honour_umask(tiny_model_dir: Path, tmp_path: Path,
                                                                        umask_022, capsys) -> None:
    photos = tmp_path / "photos"
    shutil.copytree(PHOTOS, photos, ignore=shutil.ignore_patterns("*.md"))
    out = tmp_path / "concepts" / "dogA.safetensors"
    env = {**os.environ, "SPECTRAL_DIFFUSION_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "spectral_diffusion", "train", str(photos), "--token", "<dogA>", "--class-word", "dog",
         "--base", str(tiny_model_dir), "--steps", "40", "--batch-size", "1", "--rank", "4", "--preview-images", "1",
         "--sample-steps", "2", "--checkpoint-every", "20", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    log = (run.stdout + run.stderr).splitlines()
    assert len(log) < 60, log
    assert not any("\r" in line or "\x1b" in line for line in log), log  # no bars, no escape codes
    assert sum("training <doga>: step" in line and "s/step" in line for line in log) >= 5
    with (tmp_path / "concepts" / "dogA.loss.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 41)) and all(float(r["loss"]) > 0 for r in rows)
    written = [out, out.with_suffix(".json"), out.with_name("dogA.preview.png"), out.with_name("dogA.loss.csv")]

    lora = tmp_path / "loras" / "dogA_lora.safetensors"
    assert main(["export-lora", str(out), "--out", str(lora)]) == 0
    assert main(["generate", "--base", str(tiny_model_dir), "--concepts", str(out), "--prompt", "a <doga> dog",
                 "--steps", "2", "--out", str(tmp_path / "images")]) == 0
    assert main(["fuse", str(out), "--base", str(tiny_model_dir), "--out", str(tmp_path / "fused")]) == 0
    assert "Loading" not in capsys.readouterr().err  # diffusers' and transformers' loading bars are off
    written += [lora, lora.with_name("<doga>.safetensors"), *(tmp_path / "images").iterdir()]
    written += [p for p in (tmp_path / "fused").rglob("*") if p.is_file()]
    assert {p.name: oct(_mode(p)) for p in written} == {p.name: "0o644" for p in written}


def test_progress_is_a_bar_on_a_terminal_and_periodic_lines_otherwise() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    plain = io.StringIO()
    progress = StepProgress(100, desc="training", stream=plain)
    for _ in range(100):
        progress.update(loss=0.5, lr=1e-3)
    lines = plain.getvalue().splitlines()
    assert len(lines) == 11 and lines[-1].startswith("training: step 100/100  loss 0.5000  lr 1.00e-03")
    terminal = Terminal()
    bar = StepProgress(5, desc="training", stream=terminal)
    for _ in range(5):
        bar.update(loss=0.5)
    bar.close()
    assert "\r" in terminal.getvalue() and "5/5" in terminal.getvalue()
