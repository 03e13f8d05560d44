"""The offline CLIP tokenizer: every listed word is one token, other text still tokenizes, files reload."""

from transformers import CLIPTokenizer

from spectral_diffusion.testing.tiny_sd import WORDS
from spectral_diffusion.tokenizer import build_clip_tokenizer
from spectral_diffusion.toyworld.model import vocabulary


def test_every_listed_word_is_one_token(tmp_path) -> None:
    words = sorted(set(WORDS) | set(vocabulary()))
    tokenizer = build_clip_tokenizer(words, tmp_path)
    split = [w for w in words if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
    assert split == []
    ids = tokenizer("a photo of a white triangle").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "white</w>", "triangle</w>", "<|endoftext|>"]


def test_unlisted_text_falls_back_to_bytes_and_files_reload(tmp_path) -> None:
    tokenizer = build_clip_tokenizer(["red", "dog"], tmp_path)
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("zebra!", add_special_tokens=False).input_ids)
    assert "".join(pieces).replace("</w>", "") == "zebra!"
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert reloaded("a red dog").input_ids == tokenizer("a red dog").input_ids
    assert len(reloaded) == len(tokenizer)
