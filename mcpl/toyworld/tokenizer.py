"""Build the toy world's CLIPTokenizer from a hand-made vocabulary and BPE merges.

transformers 5 only has the fast CLIPTokenizer, so we construct its vocab and merges
directly. Every listed word becomes one whole token; every lowercase letter, digit and
common punctuation character is in the vocab with and without the `</w>` suffix, so any
text tokenizes (into pieces) without hitting the unknown token.
"""

from __future__ import annotations

import string
from pathlib import Path

from transformers import CLIPTokenizer

from mcpl.toyworld.render import COLOURS, SHAPES

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOW = "</w>"
MAX_LENGTH = 16

# Words that must be whole tokens. CLIP's pre-tokenizer splits "close-up" into
# "close", "-", "up", so those parts are whole words instead.
EXTRA_WORDS: tuple[str, ...] = (
    "object", "thing", "photo", "of", "a", "an", "the", "and", "with", "rendering",
    "picture", "image", "cropped", "close", "up", "bright", "dark", "small", "large",
    "good", "clean", "nice", "weird", "cool", "big", "in", "on", "next", "to", "left",
    "right", "shape", "shapes", "scene", "colour", "color", "two", "three", "one",
)  # fmt: skip
PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


def caption_words() -> list[str]:
    """Every word a toy caption can contain."""
    return ["a", "and", *COLOURS, *SHAPES]


def whole_words() -> list[str]:
    """All words that must map to a single token, deduplicated in a stable order."""
    out: list[str] = []
    for w in [*caption_words(), *EXTRA_WORDS]:
        if w not in out:
            out.append(w)
    return out


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Reference BPE (same algorithm as CLIP's) on one pre-tokenized word."""
    parts = list(word[:-1]) + [word[-1] + EOW]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))]
        best, i = min(pairs)
        if best == 1 << 30:
            break
        a, b = parts[i], parts[i + 1]
        merged, j = [], 0
        while j < len(parts):
            if j < len(parts) - 1 and parts[j] == a and parts[j + 1] == b:
                merged.append(a + b)
                j += 2
            else:
                merged.append(parts[j])
                j += 1
        parts = merged
    return parts


def build_vocab_and_merges(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab (token -> id) and merges such that each word in `words` is one token.

    Merges are added left to right per word; a word that an earlier merge has split
    differently gets a merge of its current first two pieces, until it is whole.
    """
    words = whole_words() if words is None else words
    tokens: list[str] = [BOS, EOS]
    for ch in string.ascii_lowercase + string.digits + PUNCT:
        tokens += [ch, ch + EOW]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}

    def add_merge(a: str, b: str) -> None:
        if (a, b) not in ranks:
            ranks[(a, b)] = len(merges)
            merges.append((a, b))
        if a + b not in tokens:
            tokens.append(a + b)

    for w in words:
        if len(w) == 1:
            continue
        parts = list(w[:-1]) + [w[-1] + EOW]
        acc = parts[0]
        for p in parts[1:]:
            add_merge(acc, p)
            acc = acc + p
    for _ in range(1000):  # repair words split by other words' merges
        broken = [w for w in words if len(_bpe(w, ranks)) > 1]
        if not broken:
            break
        for w in broken:
            pieces = _bpe(w, ranks)
            if len(pieces) > 1:
                add_merge(pieces[0], pieces[1])
    else:  # pragma: no cover
        raise RuntimeError("could not make every word whole")
    vocab = {t: i for i, t in enumerate(tokens)}
    return vocab, merges


def build_tokenizer(max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """A CLIPTokenizer padded with <|endoftext|> to `max_length` tokens."""
    vocab, merges = build_vocab_and_merges()
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    tok.model_max_length = max_length
    return tok


def save_tokenizer(path: str | Path, max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """Build and save the tokenizer (vocab.json, merges.txt, tokenizer.json, config)."""
    tok = build_tokenizer(max_length)
    tok.save_pretrained(str(path))
    return tok
