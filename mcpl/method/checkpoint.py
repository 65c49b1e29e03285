"""Atomic, resumable checkpoints: tensors in safetensors, the rest in JSON.

A checkpoint is written into a temporary folder and renamed into place, so a run killed
mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


def save_checkpoint(root: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict, keep: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / STATE_TENSORS))
    (tmp / STATE_JSON).write_text(json.dumps({**meta, "step": step}, indent=1, sort_keys=True))
    for file in tmp.iterdir():
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.exists():
        return []
    done = [p for p in root.glob("step_*") if (p / STATE_JSON).exists() and (p / STATE_TENSORS).exists()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def load_latest(root: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, meta) of the newest complete checkpoint, or None."""
    checkpoints = list_checkpoints(root)
    if not checkpoints:
        return None
    latest = checkpoints[-1]
    return load_file(str(latest / STATE_TENSORS)), json.loads((latest / STATE_JSON).read_text())
