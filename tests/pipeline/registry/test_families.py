"""The registry across model families: versions say their family and widths; loading checks them."""

from __future__ import annotations

import pytest
import torch
from helpers.images import two_square_image

from mcpl.config import RunOptions, TrainConfig
from mcpl.errors import RegistryError
from mcpl.job.run import run_job
from mcpl.method.inputs import JobInput


@pytest.fixture(scope="module")
def published_sdxl(tiny_sdxl, tmp_path_factory):
    from mcpl.pipeline.registry.publish import publish_bundles
    from mcpl.pipeline.tracking.store import client_for

    tmp = tmp_path_factory.mktemp("reg-xl")
    run_job(tiny_sdxl, [JobInput.from_text(two_square_image(), "a red <kite|object|red> and a <sky|thing>",
                                           source="k.png")],
            TrainConfig(steps=2, batch_size=2, map_timesteps=2), tmp / "job", options=RunOptions(samples=0))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    report = publish_bundles(tmp / "job", uri, snapshot=False)
    return {"uri": uri, "names": [n for n, _ in report.created], "client": client_for(uri)}


def test_versions_record_family_and_widths(published_sdxl):
    name = next(n for n in published_sdxl["names"] if n.endswith(".kite"))
    tags = published_sdxl["client"].get_model_version(name, "1").tags
    assert tags["family"] == "sdxl" and tags["widths"] == "32,64"


def test_loading_by_name_fills_both_encoders_and_refuses_another_family(published_sdxl, tiny_sdxl, tiny_model):
    from mcpl.concepts.generate import generate, load_pipeline
    from mcpl.pipeline.registry.refs import load_into_pipeline

    name = next(n for n in published_sdxl["names"] if n.endswith(".kite"))
    pipe = load_pipeline(tiny_sdxl, "cpu")
    loaded = load_into_pipeline(pipe, [name], uri=published_sdxl["uri"])
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        assert loaded[0].token in tokenizer.get_vocab()
    out = generate(pipe, f"a photo of {loaded[0].token}", [loaded[0].token], num_images=1, steps=2)
    assert out.maps[0][loaded[0].token].ndim == 2 and torch.isfinite(out.maps[0][loaded[0].token]).all()
    with pytest.raises(RegistryError, match="learned on a sdxl model"):
        load_into_pipeline(load_pipeline(tiny_model, "cpu"), [name], uri=published_sdxl["uri"])
