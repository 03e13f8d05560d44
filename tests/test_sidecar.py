"""The sidecar beside a concept file: what the trainer writes is what listings read; a bad one is only ignored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spectral_diffusion.concept_file import ConceptMeta
from spectral_diffusion.sidecar import Sidecar, read_sidecar, sidecar_path, write_sidecar

META = ConceptMeta(variant="additive", rank=4, band=1, targets="kv", base_fingerprint="f" * 16, token="<DogA>",
                   token_names=["<DogA>", "<DogA>_1"], class_word="dog")


def test_what_is_written_is_read_back(tmp_path: Path) -> None:
    concept = tmp_path / "dogA.safetensors"
    preview = tmp_path / "dogA.preview.png"
    preview.write_bytes(b"png")
    assert write_sidecar(concept, META, example_prompt="a photo of <doga> dog", base_model="toy", steps=2, images=3,
                         preview=preview) == sidecar_path(concept) == tmp_path / "dogA.json"
    fields = json.loads(sidecar_path(concept).read_text())
    assert (fields["trigger_words"], fields["token_names"], fields["band"]) == (["<doga>"], ["<doga>", "<doga>_1"], 1)
    assert fields["preview"] == "dogA.preview.png" and fields["concept_file"] == "dogA.safetensors"
    assert read_sidecar(concept) == Sidecar(trigger_words=("<doga>",), base_model="toy", preview=preview)
    preview.unlink()
    assert read_sidecar(concept).preview is None  # a preview that is gone is not shown


@pytest.mark.parametrize("text", [None, "{broken", "[1, 2]", '{"preview": "../elsewhere.png"}'])
def test_a_missing_or_bad_sidecar_gives_the_defaults(tmp_path: Path, text: str | None) -> None:
    concept = tmp_path / "dogA.safetensors"
    (tmp_path.parent / "elsewhere.png").write_bytes(b"png")
    if text is not None:
        sidecar_path(concept).write_text(text)
    assert read_sidecar(concept) == Sidecar()  # and a preview never leaves the concept's folder
