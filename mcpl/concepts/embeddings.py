"""Learned-embedding files: safetensors only (nothing is ever unpickled).

Our per-concept file is diffusers' textual-inversion layout, `{token: float32[n, dim]}`,
with string metadata in the safetensors header. Exports cover the conventions other
tools read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

EMBEDS_FILE = "learned_embeds.safetensors"
ExportFormat = Literal["diffusers", "a1111", "comfyui"]


def save_concept(path: Path, token: str, vectors: torch.Tensor, metadata: dict[str, object]) -> Path:
    """Write one concept: `{token: float32[n_vectors, dim]}` + JSON-encoded metadata values."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()}
    tmp = path.with_suffix(".tmp")
    save_file({token: vectors.detach().float().cpu().contiguous()}, str(tmp), metadata=header)
    tmp.replace(path)
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


def export_concept(src: str | Path, out_dir: str | Path, fmt: ExportFormat = "diffusers",
                   name: str | None = None) -> Path:
    """Write a concept where another tool expects it.

    - diffusers: `{token: [n, dim]}` (`pipe.load_textual_inversion(file)`).
    - a1111 / comfyui: `{"emb_params": [n, dim]}` in `<name>.safetensors`; both tools take
      the trigger word from the file name (`embedding:<name>` in ComfyUI).
    """
    token, vectors, metadata = load_concept(src)
    stem = name or token.strip("<>")
    out = Path(out_dir)
    if fmt == "diffusers":
        return save_concept(out / f"{stem}.safetensors", token, vectors, metadata)
    if fmt in ("a1111", "comfyui"):
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{stem}.safetensors"
        save_file({"emb_params": vectors.contiguous()}, str(path), metadata=metadata)
        return path
    raise ValueError(f"unknown export format {fmt!r}; choose diffusers, a1111 or comfyui")
