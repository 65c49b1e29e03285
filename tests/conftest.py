"""Shared fixtures: one tiny random SD model per session, built through the real save/load path.

Test files mirror the packages (tests/method, tests/pipeline/data, ...); helpers are in
tests/helpers (on the path through pytest's `pythonpath`).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers.images import two_square_image  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(1)

TWO_CONCEPTS = "a photo of a red <c1|object|red> and a blue <c2|thing|blue>"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from mcpl.method.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> str:
    from mcpl.method.tiny import build_tiny_sdxl

    return str(build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_ldm(tmp_path_factory) -> str:
    from mcpl.method.tiny import build_tiny_ldm

    return str(build_tiny_ldm(tmp_path_factory.mktemp("models") / "tiny-ldm"))


@pytest.fixture(scope="session")
def tiny_sd2v(tmp_path_factory) -> str:
    from mcpl.method.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd2v", prediction_type="v_prediction"))


def square_mask(box) -> Image.Image:
    m = Image.new("L", (32, 32), 0)
    m.paste(255, box)
    return m


@pytest.fixture(scope="session")
def bundle(tiny_model, tmp_path_factory):
    """One finished job (full MCPL, masks, samples) shared by the output and CLI tests."""
    from mcpl.config import RunOptions, TrainConfig
    from mcpl.job.run import run_job
    from mcpl.method.inputs import JobInput

    out = tmp_path_factory.mktemp("job")
    masks = {"<c1>": square_mask((2, 2, 14, 14)), "<c2>": square_mask((18, 18, 30, 30))}
    inputs = [JobInput.from_text(two_square_image(), TWO_CONCEPTS, source="two.png", masks=masks)]
    result = run_job(tiny_model, inputs, TrainConfig.full_mcpl(steps=6, checkpoint_every=3), out,
                     options=RunOptions(samples=1, sample_steps=2, progress=False))
    return result


@pytest.fixture
def scene() -> Image.Image:
    return two_square_image()
