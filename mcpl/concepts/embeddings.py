"""Learned-embedding files: safetensors only (nothing is ever unpickled).

Our per-concept files are diffusers' textual-inversion layout, `{token: float32[n, dim]}`,
one file per text encoder (`learned_embeds.safetensors`, and `learned_embeds_2.safetensors`
for SDXL's text_encoder_2, as diffusers' SDXL example writes them), with string metadata
in the safetensors header (family, widths, base model, sentence, ...). Exports cover the
conventions other tools read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save

EMBEDS_FILE = "learned_embeds.safetensors"
ExportFormat = Literal["diffusers", "a1111", "comfyui", "kohya"]
SINGLE_FILE_KEY = "emb_params"  # SD 1.x/2.x one-file layout of A1111 / ComfyUI / kohya


def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """safetensors' save_file, with the header's keys in sorted order: safetensors writes its metadata
    map in a per-process random order, and the same tensors must give the same bytes (DVC hashes them)."""
    blob = save(tensors, metadata=metadata)
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    text = json.dumps({k: dict(sorted(v.items())) if k == "__metadata__" else v for k, v in sorted(header.items())},
                      separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) <= size:  # same header length (padded with spaces, as safetensors pads): offsets stay valid
        blob = blob[:8] + text + b" " * (size - len(text)) + blob[8 + size:]
    Path(path).write_bytes(blob)
    return Path(path)


def stack_file(folder_or_file: str | Path, suffix: str) -> Path:
    """The file of one text stack: `learned_embeds{suffix}.safetensors` beside the primary file."""
    path = Path(folder_or_file)
    base = path if path.suffix == ".safetensors" else path / EMBEDS_FILE
    return base.with_name(f"{base.stem}{suffix}{base.suffix}")


def save_concept(path: Path, token: str, vectors: torch.Tensor, metadata: dict[str, object]) -> Path:
    """Write one concept file: `{token: float32[n_vectors, dim]}` + JSON-encoded metadata values."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()}
    tmp = path.with_suffix(".tmp")
    save_file({token: vectors.detach().float().cpu().contiguous()}, str(tmp), metadata=header)
    tmp.replace(path)
    return path


def save_concept_stacks(path: Path, token: str, vectors: list[torch.Tensor], suffixes: list[str],
                        export_keys: list[str], metadata: dict[str, object]) -> Path:
    """One file per text stack (the primary at `path`), each with the family's file facts in its header."""
    facts = {**metadata, "file_suffixes": suffixes, "export_keys": export_keys,
             "widths": [int(v.shape[-1]) for v in vectors]}
    for rows, suffix in zip(vectors, suffixes, strict=True):
        save_concept(stack_file(path, suffix), token, rows, facts)
    return path


def load_concept(path: str | Path) -> tuple[str, torch.Tensor, dict[str, str]]:
    """Read a single-token embedding file: (token, float32[n, dim], metadata)."""
    with safe_open(str(path), framework="pt") as fh:
        keys = list(fh.keys())
        if len(keys) != 1:
            raise ValueError(f"{path}: expected one token, found {len(keys)} tensors ({keys[:5]})")
        tensor = fh.get_tensor(keys[0])
        metadata = fh.metadata() or {}
    if tensor.ndim == 1:
        tensor = tensor[None]
    return keys[0], tensor.float(), metadata


@dataclass
class ConceptFiles:
    """A concept as stored: its token, one [n, width] tensor per text stack, and the header facts."""

    token: str
    vectors: list[torch.Tensor]
    metadata: dict[str, str]

    def fact(self, key: str, default=None):
        raw = self.metadata.get(key)
        if raw is None:
            return default
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    @property
    def family(self) -> str:
        return str(self.fact("family", "sd"))

    @property
    def widths(self) -> list[int]:
        return [int(v.shape[-1]) for v in self.vectors]

    @property
    def export_keys(self) -> list[str]:
        return list(self.fact("export_keys", [""] * len(self.vectors)))


def load_concept_files(path: str | Path) -> ConceptFiles:
    """A concept's primary file and its other stacks' files (named in its header)."""
    token, primary, metadata = load_concept(path)
    vectors = [primary]
    try:
        suffixes = json.loads(metadata.get("file_suffixes", '[""]'))
    except ValueError:
        suffixes = [""]
    for suffix in suffixes[1:]:
        other, rows, _ = load_concept(stack_file(path, suffix))
        if other != token:
            raise ValueError(f"{stack_file(path, suffix)} holds {other}, not {token}")
        vectors.append(rows)
    return ConceptFiles(token, vectors, metadata)


def export_concept(src: str | Path, out_dir: str | Path, fmt: ExportFormat = "diffusers",
                   name: str | None = None) -> Path:
    """Write a concept where another tool expects it; returns the (first) file written.

    - diffusers: `{token: [n, dim]}` per text encoder (`<name>.safetensors`, SDXL also
      `<name>_2.safetensors`): `pipe.load_textual_inversion(file)`, for SDXL's second file with
      `text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2`.
    - a1111 / comfyui / kohya: one `<name>.safetensors`; SD 1.x/2.x `{"emb_params": [n, dim]}`,
      SDXL `{"clip_l": [n, 768-width], "clip_g": [n, 1280-width]}`; the tools take the trigger
      word from the file name (`embedding:<name>` in ComfyUI).
    """
    concept = load_concept_files(src)
    stem = name or concept.token.strip("<>")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "diffusers":
        first = out / f"{stem}.safetensors"
        for rows, suffix in zip(concept.vectors, json.loads(concept.metadata.get("file_suffixes", '[""]')),
                                strict=True):
            save_concept(stack_file(first, suffix), concept.token, rows, concept.metadata)
        return first
    if fmt in ("a1111", "comfyui", "kohya"):
        path = out / f"{stem}.safetensors"
        keys = concept.export_keys
        tensors = ({SINGLE_FILE_KEY: concept.vectors[0].contiguous()} if len(concept.vectors) == 1 or not all(keys)
                   else {k: v.contiguous() for k, v in zip(keys, concept.vectors, strict=True)})
        save_file(tensors, str(path), metadata=concept.metadata)
        return path
    raise ValueError(f"unknown export format {fmt!r}; choose diffusers, a1111, comfyui or kohya")
