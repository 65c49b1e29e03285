"""`mcpl train` and `mcpl generate` as a user runs them: a real SIGKILL + rerun, clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from helpers.images import two_square_image
from safetensors.torch import load_file

TWO = "a photo of a red <c1|object|red> and a blue <c2|thing|blue>"


def cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mcpl", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_cli_kill_and_rerun_equals_uninterrupted(tiny_model, tmp_path):
    """SIGKILL mid-training, rerun the same command: same embeddings as a run never stopped."""
    image = tmp_path / "two.png"
    two_square_image().save(image)
    common = ["train", "--model", tiny_model, "--image", str(image), "--sentence", TWO, "--full",
              "--steps", "120", "--set", "checkpoint_every=20", "--samples", "0", "--threads", "1"]
    straight = cli(*common, "--out", str(tmp_path / "a"), cwd=tmp_path)
    killed = cli(*common, "--out", str(tmp_path / "b"), cwd=tmp_path)
    deadline = time.time() + 120
    while not list((tmp_path / "b" / "checkpoints").glob("step_00000040")) and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "b" / "job.json").exists(), "the run should have been killed before finishing"
    rerun = cli(*common, "--out", str(tmp_path / "b"), cwd=tmp_path)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    assert straight.wait(timeout=300) == 0
    a = load_file(str(tmp_path / "a" / "embeddings.safetensors"))
    b = load_file(str(tmp_path / "b" / "embeddings.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = json.loads((tmp_path / "b" / "job.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, 121))


def test_cli_generate_writes_images_and_overlays(bundle, tmp_path):
    proc = cli("generate", "a <c1> and a <c2>", "--concepts", str(bundle.out_dir), "--num", "2",
               "--steps", "2", "--out", str(tmp_path / "gen"), cwd=tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert (tmp_path / "gen" / "image_1.png").exists() and (tmp_path / "gen" / "attention_1.png").exists()


def test_cli_reports_bad_sentence_clearly(tmp_path, tiny_model):
    two_square_image().save(tmp_path / "x.png")
    proc = cli("train", "--model", tiny_model, "--image", str(tmp_path / "x.png"), "--sentence", "a red square",
               cwd=tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "error: no placeholder" in out
