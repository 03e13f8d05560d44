"""Concept tokens: multi-vector names, diffusers prompt expansion, refusals, and row-only training."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline

from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.tokens import (
    ConceptEmbeddings,
    add_concept_tokens,
    canonical_prompt,
    expand_prompt,
    initial_embeddings,
    token_ids,
)


def _encode(pipe: StableDiffusionPipeline, prompt: str) -> torch.Tensor:
    ids = pipe.tokenizer(expand_prompt(pipe.tokenizer, prompt), padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


def test_added_tokens_expand_in_prompts_and_keep_old_rows(tiny_pipe: StableDiffusionPipeline) -> None:
    tokenizer, encoder = tiny_pipe.tokenizer, tiny_pipe.text_encoder
    old = encoder.get_input_embeddings().weight.detach().clone()
    rows = torch.randn(3, old.shape[1], generator=torch.Generator().manual_seed(0))
    names = add_concept_tokens(tokenizer, encoder, "<dogA>", rows)
    assert names == ["<doga>", "<doga>_1", "<doga>_2"]  # stored lower-case: the one trigger word
    weight = encoder.get_input_embeddings().weight
    assert weight.shape[0] == old.shape[0] + 3 == len(tokenizer)
    assert torch.equal(weight[: old.shape[0]], old)
    assert torch.equal(weight[token_ids(tokenizer, names)], rows)
    # The stored spelling is what diffusers' own expansion (used by every pipeline) finds all vectors by ...
    assert tiny_pipe.maybe_convert_prompt("a photo of <doga> dog", tokenizer) == "a photo of <doga> <doga>_1 <doga>_2 dog"
    # ... and here any spelling is respelled first.
    assert canonical_prompt(tokenizer, "a <DOGA> and <dogA>_1, dog") == "a <doga> and <doga>_1, dog"
    for prompt in ("a <dogA>", "a <doga>", "a <DogA>"):
        assert tokenizer(expand_prompt(tokenizer, prompt)).input_ids[2:5] == token_ids(tokenizer, names)


@pytest.mark.parametrize("token", ["dog", "<dogA>", "<dogA>_1", "<DOGA>", "two words", "", "{class_word}", "<{token}>",
                                   "<a/b>"])
def test_taken_or_malformed_tokens_are_refused(tiny_pipe: StableDiffusionPipeline, token: str) -> None:
    dim = tiny_pipe.text_encoder.get_input_embeddings().embedding_dim
    add_concept_tokens(tiny_pipe.tokenizer, tiny_pipe.text_encoder, "<dogA>", torch.zeros(2, dim))
    size = len(tiny_pipe.tokenizer)
    message = ("already in the tokenizer's vocabulary" if token in ("dog", "<dogA>", "<dogA>_1", "<DOGA>")
               else "must not contain braces" if "{" in token else "slashes" if "/" in token else "one word")
    with pytest.raises(SpectralDiffusionError, match=message):
        add_concept_tokens(tiny_pipe.tokenizer, tiny_pipe.text_encoder, token, torch.zeros(1, dim))
    assert len(tiny_pipe.tokenizer) == size  # nothing half-added


def test_wrong_embedding_width_is_refused(tiny_pipe: StableDiffusionPipeline) -> None:
    with pytest.raises(SpectralDiffusionError, match="768-dim embeddings; this text encoder uses 32"):
        add_concept_tokens(tiny_pipe.tokenizer, tiny_pipe.text_encoder, "<catB>", torch.zeros(2, 768))


def test_initial_embeddings_start_near_the_class_word(tiny_pipe: StableDiffusionPipeline) -> None:
    tokenizer, encoder = tiny_pipe.tokenizer, tiny_pipe.text_encoder
    init = initial_embeddings(tokenizer, encoder, "dog", 2, torch.Generator().manual_seed(0))
    again = initial_embeddings(tokenizer, encoder, "dog", 2, torch.Generator().manual_seed(0))
    dog = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("dog</w>")].detach()
    assert torch.equal(init, again) and not torch.equal(init[0], init[1])
    assert torch.allclose(init, dog.expand(2, -1), atol=0.2 * float(dog.norm()))
    assert torch.nn.functional.cosine_similarity(init, dog[None]).min() > 0.95


def test_concept_embeddings_train_only_their_rows(tiny_pipe: StableDiffusionPipeline) -> None:
    tokenizer, encoder = tiny_pipe.tokenizer, tiny_pipe.text_encoder
    encoder.requires_grad_(False)
    init = initial_embeddings(tokenizer, encoder, "dog", 2, torch.Generator().manual_seed(0))
    names = add_concept_tokens(tokenizer, encoder, "<dogA>", torch.zeros_like(init))  # placeholder rows
    rows = ConceptEmbeddings(encoder.get_input_embeddings(), token_ids(tokenizer, names), init)
    with torch.no_grad():
        rows.rows.add_(torch.randn(rows.rows.shape, generator=torch.Generator().manual_seed(1)))
    hidden = _encode(tiny_pipe, "a photo of <dogA> on the beach")
    hidden.square().sum().backward()
    assert rows.rows.grad is not None and rows.rows.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.parameters())
    rows.cap_norms(0.5)
    assert torch.allclose(rows.rows.norm(dim=1), torch.full((2,), 0.5))
    substituted = _encode(tiny_pipe, "a photo of <dogA> on the beach").detach()
    rows.write()  # rows go into the matrix and the hook is gone: same outputs
    torch.testing.assert_close(_encode(tiny_pipe, "a photo of <dogA> on the beach").detach(), substituted)
