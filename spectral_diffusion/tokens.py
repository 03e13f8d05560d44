"""Concept tokens: new words such as `<doga>` with their own embedding vectors.

A token owning n vectors is added as `<doga>`, `<doga>_1`, ... `<doga>_{n-1}` (the convention of diffusers'
`load_textual_inversion` and A1111), so diffusers' `maybe_convert_prompt` expands `<doga>` in a prompt into all of
them. Tokens are stored lower-case (`concept_file.canonical_token`): the spelling that diffusers'
`load_textual_inversion` matches and expands. They are added un-normalised and matched by that exact spelling;
`canonical_prompt` first respells a prompt's tokens as stored, so prompts are case-insensitive here while the stored
spelling is the one trigger word that works everywhere.

Training never touches the (frozen) embedding matrix: `ConceptEmbeddings` holds the new rows as their own parameter
and substitutes them into the embedding layer's output, so the optimizer state is n rows, not the whole vocabulary,
and every other row stays bit-identical by construction. `write()` copies the trained rows into the matrix at the end.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.loaders import TextualInversionLoaderMixin
from torch import nn
from transformers import AddedToken, PreTrainedModel, PreTrainedTokenizerBase

from spectral_diffusion.concept_file import canonical_token
from spectral_diffusion.errors import SpectralDiffusionError

# Mean norm of SD 1.5's CLIP vocabulary rows is ~0.39; Mix-of-Show stops its token embeddings at ~0.55.
NORM_CAP_FACTOR = 1.4


def token_names(token: str, num_vectors: int) -> list[str]:
    """`<doga>`, `<doga>_1`, ...: one tokenizer entry per embedding vector."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def drop_token(caption: str, token: str) -> str:
    """`caption` without `token`, spaces tidied: the ordinary prompt a concept's caption stands on ("a photo of <doga>
    dog" -> "a photo of dog"), which the locality term and closed-form fusion keep at the base's mapping."""
    return " ".join(caption.replace(token, " ").split())


def check_new_token(tokenizer: PreTrainedTokenizerBase, token: str, num_vectors: int = 1) -> None:
    """Refuse a token that is empty, has spaces or braces (caption placeholders such as `{class_word}` are replaced
    before the token is ever seen, so it would never be trained), or (with its `_i` siblings) already means something."""
    if not token or token != token.strip() or len(token.split()) != 1:
        raise SpectralDiffusionError(f"token {token!r} must be one word without spaces, e.g. <dogA>")
    if "{" in token or "}" in token:
        raise SpectralDiffusionError(f"token {token!r} must not contain braces: captions use {{token}} and "
                                     "{class_word} as placeholders; pick a word such as <dogA>")
    if any(c in token for c in "/\\\0"):
        raise SpectralDiffusionError(f"token {token!r} must not contain slashes: its embedding file is named "
                                     "after it; pick a word such as <dogA>")
    vocab = tokenizer.get_vocab()
    for name in token_names(canonical_token(token), num_vectors):
        if name in vocab or len(tokenizer.tokenize(name)) == 1:  # one piece: an existing word or added token
            raise SpectralDiffusionError(
                f"token {name!r} is already in the tokenizer's vocabulary; pick a new word such as <{name.strip('<>')}1>")


def add_concept_tokens(tokenizer: PreTrainedTokenizerBase, text_encoder: PreTrainedModel, token: str,
                       embeddings: torch.Tensor) -> list[str]:
    """Add `token` (in its canonical lower-case spelling) with one vector per row of `embeddings` [n, dim];
    return the names added.

    Grows the text encoder's embedding matrix (the old rows are kept bit-identical and keep their `requires_grad`).
    Raises `SpectralDiffusionError` if the token or one of its `_i` names is already known.
    """
    embeddings = torch.as_tensor(embeddings)
    if embeddings.ndim != 2:
        raise SpectralDiffusionError(f"token embeddings for {token} must be [n_vectors, dim], got {tuple(embeddings.shape)}")
    old = text_encoder.get_input_embeddings()
    if embeddings.shape[1] != old.embedding_dim:
        raise SpectralDiffusionError(
            f"token {token} has {embeddings.shape[1]}-dim embeddings; this text encoder uses {old.embedding_dim}")
    names = token_names(canonical_token(token), embeddings.shape[0])
    check_new_token(tokenizer, token, len(names))
    tokenizer.add_tokens([AddedToken(name, normalized=False) for name in names])
    resize_embeddings(text_encoder, len(tokenizer))
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[token_ids(tokenizer, names)] = embeddings.to(weight.device, weight.dtype)
    return names


def resize_embeddings(text_encoder: PreTrainedModel, rows: int) -> None:
    """Keep the first `rows` token-embedding rows (bit-identical, same `requires_grad`); new rows are left
    uninitialised for the caller.

    transformers' own resize draws a random init for the whole new matrix, ~1 s for CLIP's 49k rows on a CPU,
    which would dominate adding or removing a concept.
    """
    old = text_encoder.get_input_embeddings().weight
    if old.shape[0] == rows:
        return
    new = old.new_empty(rows, old.shape[1])
    kept = min(rows, old.shape[0])
    new[:kept] = old[:kept].detach()
    text_encoder.get_input_embeddings().weight = nn.Parameter(new, requires_grad=old.requires_grad)
    text_encoder.resize_token_embeddings(rows)  # same size now: only updates num_embeddings and the config


def token_ids(tokenizer: PreTrainedTokenizerBase, names: list[str]) -> list[int]:
    return [int(i) for i in tokenizer.convert_tokens_to_ids(names)]


def canonical_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """`prompt` with every added token respelled as the tokenizer holds it (`<DogA>` -> `<doga>`), so the
    case-sensitive expansion of multi-vector tokens (`maybe_convert_prompt`) sees each one."""
    stored = {t.content.lower(): t.content for t in tokenizer.added_tokens_decoder.values() if not t.special}
    if not stored:
        return prompt
    pattern = re.compile("|".join(re.escape(t) for t in sorted(stored, key=len, reverse=True)), re.IGNORECASE)
    return pattern.sub(lambda m: stored[m[0].lower()], prompt)


def expand_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | list[str]) -> str | list[str]:
    """`<DogA>` -> `<doga> <doga>_1 ...`: the canonical spelling, expanded as a diffusers pipeline does it."""
    if isinstance(prompt, str):
        prompt = canonical_prompt(tokenizer, prompt)
    else:
        prompt = [canonical_prompt(tokenizer, p) for p in prompt]
    return TextualInversionLoaderMixin().maybe_convert_prompt(prompt, tokenizer)


def initial_embeddings(tokenizer: PreTrainedTokenizerBase, text_encoder: PreTrainedModel, class_word: str,
                       num_vectors: int, generator: torch.Generator, noise: float = 0.1) -> torch.Tensor:
    """[num_vectors, dim] fp32 start vectors: the class word's mean embedding plus a small seeded random part.

    `noise` is relative to the typical row norm; it makes the vectors differ so they can learn different things.
    Without a class word the start is the mean row of the vocabulary.
    """
    weight = text_encoder.get_input_embeddings().weight.detach().float().cpu()
    ids = tokenizer.encode(class_word, add_special_tokens=False) if class_word.strip() else []
    base = weight[ids].mean(0) if ids else weight.mean(0)
    scale = noise * weight.norm(dim=1).mean() / weight.shape[1] ** 0.5
    return base.expand(num_vectors, -1) + scale * torch.randn(num_vectors, weight.shape[1], generator=generator)


def default_norm_cap(text_encoder: PreTrainedModel) -> float:
    """`NORM_CAP_FACTOR` x the mean row norm of the vocabulary (~0.55 on SD 1.5, scaled for other encoders)."""
    weight = text_encoder.get_input_embeddings().weight.detach().float()
    return float(NORM_CAP_FACTOR * weight.norm(dim=1).mean())


class ConceptEmbeddings(nn.Module):
    """Trainable rows for a concept's token ids, substituted into the frozen input-embedding layer's output."""

    def __init__(self, embedding: nn.Embedding, ids: list[int], init: torch.Tensor):
        super().__init__()
        self.embedding = [embedding]  # a list, so the frozen layer is not registered as a submodule
        self.rows = nn.Parameter(init.detach().float().clone())
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self._replacement: torch.Tensor | None = None
        self._hook = embedding.register_forward_hook(self._substitute)

    def _substitute(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        match = inputs[0].unsqueeze(-1) == self.ids.to(inputs[0].device)  # [..., seq, n]
        hit = match.any(-1, keepdim=True)
        source = self.rows if self._replacement is None else self._replacement
        rows = source.to(output.dtype)[match.int().argmax(-1)]
        return torch.where(hit, rows, output)

    @contextmanager
    def replaced(self, rows: torch.Tensor) -> Iterator[None]:
        """Substitute `rows` for the trained ones while inside: the same prompts with another token's vectors."""
        self._replacement = rows
        try:
            yield
        finally:
            self._replacement = None

    @torch.no_grad()
    def cap_norms(self, cap: float) -> None:
        """Rescale rows longer than `cap` back to it (Mix-of-Show stops its embeddings growing past ~0.55)."""
        norms = self.rows.norm(dim=1, keepdim=True)
        self.rows.mul_(torch.where(norms > cap, cap / norms, torch.ones_like(norms)))

    @torch.no_grad()
    def write(self) -> None:
        """Copy the trained rows into the embedding matrix and stop substituting."""
        weight = self.embedding[0].weight
        weight[self.ids.to(weight.device)] = self.rows.to(weight.device, weight.dtype)
        self.remove()

    def remove(self) -> None:
        self._hook.remove()
