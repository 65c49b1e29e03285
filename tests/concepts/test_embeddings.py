"""Learned-embedding files in the layouts other tools read."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from mcpl.concepts.embeddings import export_concept


def test_export_formats(bundle, tmp_path):
    src = bundle.concept_files["<c2>"]
    diffusers_file = export_concept(src, tmp_path / "d")
    assert load_file(str(diffusers_file)).keys() == {"<c2>"}
    a1111 = export_concept(src, tmp_path / "a", fmt="a1111", name="my-c2")
    assert a1111.name == "my-c2.safetensors" and load_file(str(a1111)).keys() == {"emb_params"}
    with pytest.raises(ValueError, match="unknown export format"):
        export_concept(src, tmp_path, fmt="ckpt")
