"""Pretraining on a tiny config: stop-and-resume is bit-identical to an uninterrupted run.

The config is the real recipe scaled down (a few dozen pool scenes, 3 VAE steps, 8 UNet
steps with the grounding loss and its coverage term switched on mid-run, and partial
captions), so the test exercises the real checkpoint, export and capture code paths in a
few seconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from mcpl.method.checkpoint import list_checkpoints  # noqa: E402
from mcpl.toyworld import pretrain  # noqa: E402

TINY = [
    "--n-pool", "12", "12", "12",
    "--vae-steps", "3", "--vae-batch", "8",
    "--steps", "8", "--batch", "4", "--warmup", "2",
    "--curriculum-steps", "3", "--ground-start", "1", "--ground-cover-start", "2", "--ground-tmax", "1000",
    "--ckpt-every", "3", "--export-every", "100", "--log-every", "2", "--p-partial", "0.3",
]


def run(tmp: Path, name: str, *extra: str) -> tuple[Path, Path]:
    out, ckpt = tmp / f"{name}-model", tmp / f"{name}-ckpt"
    pretrain.main([*TINY, "--out", str(out), "--ckpt", str(ckpt), *extra])
    return out, ckpt


def export_tensors(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for part in ("unet", "text_encoder", "vae"):
        for k, v in load_file(str(next((out / part).glob("*.safetensors")))).items():
            tensors[f"{part}/{k}"] = v
    return tensors


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_stop_and_resume_is_bit_identical(tmp_path: Path) -> None:
    full_out, full_ckpt = run(tmp_path, "full")
    part_out, part_ckpt = run(tmp_path, "part", "--stop-after", "4")
    assert not (part_out / "model_index.json").exists()  # stopped before the end: no export yet
    assert [p.name for p in list_checkpoints(part_ckpt)] == ["step_00000003", "step_00000004"]
    stopped = json.loads((part_ckpt / "step_00000004" / "state.json").read_text())
    assert stopped["step"] == 4 and stopped["git_revision"] and stopped["config"]["steps"] == 8
    run(tmp_path, "part")  # resumes from step 4

    assert_identical(export_tensors(full_out), export_tensors(part_out))
    last_full = load_file(str(list_checkpoints(full_ckpt)[-1] / "state.safetensors"))
    last_part = load_file(str(list_checkpoints(part_ckpt)[-1] / "state.safetensors"))
    assert any(k.startswith("opt.") for k in last_full) and any(k.startswith("ema_unet.") for k in last_full)
    assert_identical(last_full, last_part)
    # keep 2: the step-8 checkpoint and the one before it
    assert [p.name for p in list_checkpoints(full_ckpt)] == ["step_00000006", "step_00000008"]

    info = json.loads((full_out / "toyworld_pretrain.json").read_text())
    assert info["step"] == 8 and info["git_revision"] and info["init_from"] is None
    assert json.loads((full_out / "mcpl_hints.json").read_text()) == pretrain.MCPL_HINTS
    log = [json.loads(line) for line in (part_ckpt / "train_log.jsonl").read_text().splitlines()]
    assert any(r["stage"] == "stopped" and r["step"] == 4 for r in log)
    assert any(r["stage"] == "unet" and r["ground"] > 0 for r in log)  # the grounding loss ran


def test_init_from_an_export_starts_from_its_weights(tmp_path: Path) -> None:
    base, _ = run(tmp_path, "base", "--steps", "2", "--ckpt-every", "2")
    hints = {"templates": ["{}"], "learning_rate": 1e-3}
    (base / "mcpl_hints.json").write_text(json.dumps(hints))
    cont, ckpt = tmp_path / "cont-model", tmp_path / "cont-ckpt"
    pretrain.main([*TINY, "--out", str(cont), "--ckpt", str(ckpt), "--init-from", str(base),
                   "--steps", "1", "--lr", "0", "--warmup", "1", "--seed", "1"])
    # lr 0: AdamW's weight decay is scaled by lr too, so the weights stay those of the export
    a, b = export_tensors(base), export_tensors(cont)
    assert_identical(a, b)
    info = json.loads((cont / "toyworld_pretrain.json").read_text())
    assert info["init_from"] == str(base) and info["config"]["seed"] == 1
    assert (ckpt / "vae" / "config.json").exists()
    assert json.loads((cont / "mcpl_hints.json").read_text()) == hints  # hints travel with the weights
