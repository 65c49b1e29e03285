"""The only trainable thing in MCPL: new token rows, kept as their own float32 parameter.

The frozen embedding table is wrapped, not resized or copied, so nothing needs undoing
after an optimiser step and the base model is never modified. Like peft's adapters, the
rows are attached to a text encoder only while they are used (`attached`) and unloaded
after, so several jobs can share one frozen encoder (packing) and the model is handed
back untouched.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from mcpl.errors import SentenceError
from mcpl.method.families.base import TextStack
from mcpl.method.prompts import PromptPlan


class LearnedTokenEmbedding(nn.Module):
    """Token embedding = frozen table for old ids, a trainable fp32 row for each new id."""

    def __init__(self, base: nn.Embedding, first_new_id: int, init_rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.first_new_id = first_new_id
        self.rows = nn.Parameter(init_rows.detach().to(torch.float32).clone())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.first_new_id
        frozen = self.base(input_ids.clamp(max=self.first_new_id - 1))
        learned = self.rows[(input_ids - self.first_new_id).clamp(min=0)].to(frozen.dtype)
        return torch.where(is_new.unsqueeze(-1), learned, frozen)


def frozen_table(text_encoder) -> torch.Tensor:
    """The original token-embedding matrix, whether or not learned rows are attached."""
    module = text_encoder.get_input_embeddings()
    return (module.base if isinstance(module, LearnedTokenEmbedding) else module).weight


def _pair(source) -> tuple:
    """(tokenizer, encoder) of a TextStack or of Components (its primary stack)."""
    return source.tokenizer, getattr(source, "encoder", None) or source.text_encoder


def initializer_embedding(source, word: str) -> torch.Tensor:
    """Embedding of an initializer word in one encoder's own table; sub-tokens are averaged, with a warning."""
    tokenizer, encoder = _pair(source)
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids or tokenizer.unk_token_id in ids and word not in tokenizer.get_vocab():
        raise SentenceError(f"initializer word {word!r} is not known to the tokenizer")
    if len(ids) > 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        warnings.warn(f"initializer {word!r} splits into {pieces}; their embeddings are averaged",
                      stacklevel=2)
    table = frozen_table(encoder)
    return table[torch.tensor(ids, device=table.device)].float().mean(0)


def learned_rows(stack: TextStack, plan: PromptPlan) -> LearnedTokenEmbedding:
    """Add the plan's tokens to the stack's tokenizer and build a trainable row per token vector.

    Each token vector starts from its own initializer word's embedding in this encoder's
    table (the paper's code started all but the first from noise). The rows are not
    attached yet: see `attached`.
    """
    tokenizer = stack.tokenizer
    vocab = tokenizer.get_vocab()
    strings = plan.all_token_strings()
    taken = [s for s in strings if s in vocab]
    if taken:
        raise SentenceError(f"placeholder(s) {', '.join(taken)} already in the tokenizer's vocabulary")
    base = stack.encoder.get_input_embeddings()
    if isinstance(base, LearnedTokenEmbedding):
        base = base.base
    first_new_id = len(tokenizer)
    if base.num_embeddings != first_new_id:
        raise RuntimeError(f"tokenizer has {first_new_id} tokens but the embedding table {base.num_embeddings}")
    tokenizer.add_tokens(strings)
    ids = tokenizer.convert_tokens_to_ids(strings)
    if ids != list(range(first_new_id, first_new_id + len(strings))):
        raise RuntimeError("new tokens did not receive consecutive ids")
    rows = [initializer_embedding(stack, tok.initializer) for tok in plan.tokens for _ in plan.token_strings(tok)]
    return LearnedTokenEmbedding(base, first_new_id, torch.stack(rows)).to(base.weight.device)


@contextmanager
def attached(stacks: Sequence[TextStack], embeddings: Sequence[LearnedTokenEmbedding]) -> Iterator[None]:
    """Splice the rows into each encoder for the duration, then put back what was there."""
    previous = [s.encoder.get_input_embeddings() for s in stacks]
    try:
        for stack, embedding in zip(stacks, embeddings, strict=True):
            stack.encoder.set_input_embeddings(embedding)
        yield
    finally:
        for stack, module in zip(stacks, previous, strict=True):
            stack.encoder.set_input_embeddings(module)


def token_vectors(plan: PromptPlan, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """token -> float32[n_vectors, dim], in the layout of diffusers' textual-inversion files."""
    out, i = {}, 0
    for tok in plan.tokens:
        n = len(plan.token_strings(tok))
        out[tok.token] = rows[i : i + n].detach().float().cpu().contiguous()
        i += n
    return out
