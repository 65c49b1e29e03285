"""A job's prompts, tokenised in every text stack and encoded with the job's own learned rows.

nanoGPT keeps the model apart from the training loop; here the trainer steps and this
prompt encoder tokenises: it owns the job's tokenizer copies (with the new tokens), the
learned rows of each text stack, where each concept (and its adjective) sits in a prompt,
and it asks the model family for the UNet conditioning. The frozen encoders are shared:
rows are attached only while encoding, so packed jobs never see each other's words.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mcpl.errors import ModelLoadError, SentenceError
from mcpl.method.families.base import Components, Conditioning
from mcpl.method.inputs import JobInput
from mcpl.method.learned import LearnedTokenEmbedding, attached, learned_rows
from mcpl.method.prompts import PromptPlan


@dataclass
class TextBatch:
    """Tokenised prompts (one id tensor per text stack) and where each concept (and its adjective) sits."""

    ids: list[torch.Tensor]  # per stack: (N, L)
    concept_weights: torch.Tensor  # (N, C, L): 1/n at a concept's n vector positions (primary stack)
    adjective_weights: torch.Tensor  # (N, C, L): 1/m at its adjective's m positions
    images: torch.Tensor  # (N,) which training image each prompt belongs to


class PromptEncoder:
    """Tokenises a job's prompts and encodes them with the job's learned rows."""

    def __init__(self, components: Components, plan: PromptPlan, inputs: Sequence[JobInput], bind_adj: bool,
                 resolution: int) -> None:
        self.family = components.family
        check = getattr(self.family, "check_tokens", None)
        if check is not None:
            check(plan.all_token_strings())
        # The job's own tokenizer copies: the caller's components stay reusable after the job.
        self.stacks = [dataclasses.replace(s, tokenizer=copy.deepcopy(s.tokenizer)) for s in components.stacks]
        self.plan = plan
        self.inputs = list(inputs)
        self.bind_adj = bind_adj
        self.device = components.device
        self.embeddings: list[LearnedTokenEmbedding] = [learned_rows(s, plan) for s in self.stacks]
        self.token_ids = [self.tokenizer.convert_tokens_to_ids(plan.token_strings(t)) for t in plan.tokens]
        self.sizes = self.family.size_conditioning([i.image.size for i in inputs], resolution)
        self._cache: dict[tuple[int, str, int], tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, int]] = {}
        self.plan.templates = self._fitting_templates()

    @property
    def tokenizer(self):
        """The primary stack's tokenizer: its positions are the ones attention maps are read at."""
        return self.stacks[0].tokenizer

    @property
    def length(self) -> int:
        return self.stacks[0].length

    @property
    def causal(self) -> bool:
        return self.family.causal_text

    def rows(self) -> list[torch.nn.Parameter]:
        return [e.rows for e in self.embeddings]

    # ------------------------------------------------------------------------- tokenising
    def _fitting_templates(self) -> list[str]:
        """Templates whose prompts fit every stack's length for every image."""
        fits = [t for t in self.plan.templates
                if all(len(s.tokenizer(self.plan.prompt(i, t), verbose=False).input_ids) <= s.length
                       for s in self.stacks for i in range(len(self.inputs)))]
        if not fits:
            raise SentenceError(f"the sentence is longer than the model's {self.length} tokens: "
                                f"{self.plan.prompt(0, '{}')!r}")
        return fits

    def encode_prompts(self, image_index: Sequence[int], templates: Sequence[str],
                       full_length: bool = True, orders: Sequence[int] | None = None) -> TextBatch:
        """Tokenised prompts with concept/adjective positions, from a per-(image, template, order) cache.

        `orders` (PromptCL views): per prompt, which of the image's phrase orders to use (0: as written).
        The UNet needs full-length conditioning; PromptCL-only views may stop at the longest
        prompt, but only where the text encoders are causal (CLIP): there earlier positions
        get the same features whatever padding follows. A bidirectional encoder (LDMBert)
        always gets the full length.
        """
        orders = orders if orders is not None else [0] * len(templates)
        rows = [self._prompt_row(i, t, o) for i, t, o in zip(image_index, templates, orders, strict=True)]
        length = self.length if full_length or not self.causal else max(r[3] for r in rows)
        ids = [torch.stack([r[0][s][:length] for r in rows]) for s in range(len(self.stacks))]
        return TextBatch(ids, torch.stack([r[1][..., :length] for r in rows]),
                         torch.stack([r[2][..., :length] for r in rows]), torch.tensor(list(image_index)))

    def _prompt_row(self, image: int, template: str,
                    order: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, int]:
        """(ids per stack (L,), concept weights (C, L), adjective weights (C, L), used length) of one prompt."""
        key = (image, template, order)
        if key not in self._cache:
            prompt = self.plan.prompt(image, template, order)
            encoded = [s.tokenizer(prompt, padding="max_length", max_length=s.length, truncation=True,
                                   return_tensors="pt") for s in self.stacks]
            ids = [e.input_ids[0] for e in encoded]
            self._check_positions(ids)
            primary = ids[0]
            concept_w = torch.zeros(len(self.plan.tokens), primary.shape[0])
            adjective_w = torch.zeros_like(concept_w)
            for c, token_ids in enumerate(self.token_ids):
                hits = torch.isin(primary, torch.tensor(token_ids)).float()
                concept_w[c] = hits / hits.sum().clamp_min(1)
            if self.bind_adj:
                labels = self.plan.labels
                for label, entry in self.plan.adjectives(image).items():
                    span = _find(primary.tolist(), self._entry_ids(entry))
                    if span:
                        adjective_w[labels.index(label), span[0]:span[1]] = 1.0 / (span[1] - span[0])
            self._cache[key] = (ids, concept_w, adjective_w, int(encoded[0].attention_mask.sum()))
        return self._cache[key]

    def _check_positions(self, ids: list[torch.Tensor]) -> None:
        """Every stack must put the learned tokens at the same positions (maps are read in the primary's)."""
        first = self.embeddings[0].first_new_id
        where = (ids[0] >= first).nonzero().flatten().tolist()
        for stack_ids, embedding in zip(ids[1:], self.embeddings[1:], strict=True):
            if (stack_ids >= embedding.first_new_id).nonzero().flatten().tolist() != where:
                raise ModelLoadError("the model's tokenizers split this prompt differently; mcpl needs the learned "
                                     "tokens at the same positions in every text encoder")

    def _entry_ids(self, entry: str) -> list[int]:
        strings = next((self.plan.token_strings(t) for t in self.plan.tokens if t.token == entry), None)
        if strings:
            return self.tokenizer.convert_tokens_to_ids(strings)
        return self.tokenizer(entry, add_special_tokens=False).input_ids

    # --------------------------------------------------------------------------- encoding
    def condition(self, text: TextBatch) -> Conditioning:
        """The UNet conditioning of these prompts, with this job's rows attached while encoding."""
        sizes = self.sizes[text.images] if self.sizes is not None else None
        with attached(self.stacks, self.embeddings):
            return self.family.condition(self.stacks, text.ids, sizes)

    def attached(self):
        """This job's rows spliced into the shared encoders (for code that calls them directly)."""
        return attached(self.stacks, self.embeddings)


def _find(sequence: list[int], pattern: list[int]) -> tuple[int, int] | None:
    for start in range(len(sequence) - len(pattern) + 1):
        if sequence[start:start + len(pattern)] == pattern:
            return start, start + len(pattern)
    return None
