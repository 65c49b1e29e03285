"""What a job trains on: images with their concept sentences (and optional masks for evaluation).

Light on purpose (PIL and the sentence parser only): the data pipeline builds these
without loading torch or diffusers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from PIL import Image

from mcpl.method.prompts import Sentence, parse_sentence


def image_hash(img: Image.Image) -> str:
    """Content hash of the decoded pixels (format- and metadata-independent)."""
    return hashlib.sha256(img.tobytes() + repr(img.size).encode()).hexdigest()[:16]


@dataclass
class JobInput:
    """One image with its concept sentence (and optional masks for evaluation)."""

    image: Image.Image
    sentence: Sentence
    source: str = ""
    masks: dict[str, Image.Image] = field(default_factory=dict)

    @classmethod
    def from_text(cls, image: Image.Image, sentence: str, source: str = "",
                  masks: dict[str, Image.Image] | None = None) -> JobInput:
        return cls(image=image, sentence=parse_sentence(sentence), source=source, masks=masks or {})
