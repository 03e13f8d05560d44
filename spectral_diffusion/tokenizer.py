"""Build a CLIP tokenizer offline from a word list.

Real CLIP tokenizers come from the hub; tests and the toy world need one without a network. This builds a
byte-level BPE vocabulary in CLIP's own layout (byte symbols, `</w>` word ends, merges that grow each word left to
right), so whole listed words are one token and any other text still tokenizes into bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode symbols."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def _apply_bpe(parts: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Merge adjacent symbols, lowest-ranked pair first, until no known pair is left (what CLIP's BPE does)."""
    parts = list(parts)
    while len(parts) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(parts[:-1], parts[1:], strict=True))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def build_clip_tokenizer(words: Iterable[str], out_dir: str | Path, model_max_length: int = 77) -> CLIPTokenizer:
    """Write `vocab.json`/`merges.txt` for `words` (lower-cased) into `out_dir` and return the loaded tokenizer."""
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    byte_map = _bytes_to_unicode()
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted({w.lower() for w in words if w.strip()}):
        parts = [byte_map[b] for b in word.encode("utf-8")]
        parts[-1] += "</w>"
        # Segment with the merges so far, exactly as BPE will, then chain new merges over the segments: they
        # rank after every earlier merge, so BPE reaches the same segments first and then joins them whole.
        segments = _apply_bpe(parts, ranks)
        merged = segments[0]
        for nxt in segments[1:]:
            ranks.setdefault((merged, nxt), len(ranks))
            merged += nxt
            vocab.setdefault(merged, len(vocab))
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda item: item[1])]
    for special in (BOS, EOS):
        vocab.setdefault(special, len(vocab))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"),
                              model_max_length=model_max_length)
    tokenizer.save_pretrained(out)
    return tokenizer
