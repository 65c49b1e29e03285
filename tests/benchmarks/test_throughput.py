"""The throughput benchmark and its peer still run (smoke sizes; no speed is asserted, ever)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("throughput"), importlib.import_module("peer_ti")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_figures_are_medians_with_spread_and_targets_are_read_from_them(bench):
    throughput, _ = bench
    assert throughput.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert throughput.alternate(["a", "b", "c"], 1) == ["b", "c", "a"]
    report = {"sections": {"packing": {"per_k": {"4": {"speedup_wall": {"median": 1.2}}}},
                           "peer": {"sd15": {"summary": {"peer": {}, "mcpl_full": {"vs_peer_wall": {"median": 2.0}}}}}}}
    checked = throughput.targets(report)
    assert checked["missed"] == ["packed_cpu_k4_speedup>=1.5"] and checked["met"] == ["peer_sd15_mcpl_full>=1.5"]


def test_the_peer_trains_the_placeholder_row_only_and_hands_the_encoder_back(bench, tiny_model, tmp_path):
    from mcpl.method.models import load_components

    _, peer_ti = bench
    c = load_components(tiny_model)
    encoder = c.stacks[0].encoder
    before = encoder.get_input_embeddings().weight.detach().clone()
    Image.new("RGB", (16, 16), "red").save(tmp_path / "red.png")
    peer = peer_ti.TextualInversionPeer(c.tokenizer, encoder, c.vae, c.unet, c.scheduler, [tmp_path / "red.png"],
                                        peer_ti.PeerSettings(placeholder="<p>", initializer="dog", batch_size=2,
                                                             resolution=16, learning_rate=1e-2))
    assert [n for n, p in encoder.named_parameters() if p.requires_grad] == ["embeddings.token_embedding.weight"]
    start = peer.learned()["<p>"].clone()
    peer.train(2)
    table = encoder.get_input_embeddings().weight
    assert table.shape[0] == before.shape[0] + 1
    assert torch.equal(table[: before.shape[0]], before)  # every other row restored after each step
    assert not torch.equal(peer.learned()["<p>"], start)
    assert peer.optimizer.state[table]["exp_avg"].shape == table.shape  # AdamW over the whole table
    peer.close()
    assert torch.equal(encoder.get_input_embeddings().weight, before) and len(c.tokenizer) == before.shape[0]
    assert not any(p.requires_grad for p in encoder.parameters())


def test_quick_packing_and_peer_sections_write_their_report(bench, tmp_path):
    throughput, _ = bench
    out = tmp_path / "throughput.json"
    throughput.main(["--quick", "--sections", "packing,peer", "--steps", "2", "--out", str(out)])
    report = json.loads(out.read_text())
    assert not report["partial"]
    assert set(report["sections"]["packing"]["per_k"]) == {"1", "2"}
    toy = report["sections"]["peer"]["toy"]["summary"]
    assert set(toy) == {"peer", "mcpl_one", "mcpl_full", "mcpl_full_packed4"}
    assert toy["mcpl_full"]["vs_peer_wall"]["n"] == 1
    assert "packed_cpu_k4_speedup>=1.5" not in report["targets"]["figures"]  # K = 4 was not run
