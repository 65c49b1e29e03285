"""Hostile input to the registry: export names that leave --out, overwrites, tampered bundles,
registry text with control characters, and an MLflow that is down or silent.

Every case asserts that nothing is written outside the chosen folder, that the command
fails with its documented exit code and an `error:` line (never a traceback), and that an
unreachable server is never read as "no such concept" or "the name is free".
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from helpers.hostile import snapshot

from mcpl.cli import main
from mcpl.errors import BundleError


@pytest.fixture(scope="module")
def store(bundle, tmp_path_factory):
    """The session's finished job as a batch folder, published to a SQLite store."""
    from mcpl.pipeline.registry.publish import publish_bundles

    top = tmp_path_factory.mktemp("hostile-registry")
    batch = make_batch(bundle, top / "batch")
    uri = f"sqlite:///{top / 'mlflow.db'}"
    report = publish_bundles(batch, uri, snapshot=False)
    names = sorted(n for n, _ in report.created)
    assert names
    return {"top": top, "batch": batch, "uri": uri, "name": names[0], "bundle": bundle}


def make_batch(bundle, batch: Path) -> Path:
    job = bundle.record.job_id
    shutil.copytree(bundle.out_dir, batch / "jobs" / job, ignore=shutil.ignore_patterns("checkpoints"))
    (batch / "summary.json").write_text(json.dumps({"jobs": [
        {"job_id": job, "status": "done", "rows": [1], "images": ["two.png"], "group": None,
         "out_dir": f"jobs/{job}"}]}))
    return batch


def registry(uri: str, *args: str) -> int:
    return main(["registry", "--tracking-uri", uri, *args])


# ------------------------------------------------------------------------------ export
@pytest.mark.parametrize("name", ["../../x", "../x", "/tmp/mcpl-abs-export", "a/b", "..", ".hidden", "x\x00y", "",
                                  "a\\b", "~x", "x" * 300, "\x1b[31mred", "-rf"])
def test_export_name_must_be_one_plain_file_name(store, tmp_path, capsys, name):
    before = snapshot(tmp_path)
    assert registry(store["uri"], "export", store["name"], "--out", str(tmp_path / "exp"), f"--name={name}") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --name") and "is not a plain file name" in err and "\x1b" not in err
    assert snapshot(tmp_path) == before  # nothing written, not even the --out folder
    assert not Path("/tmp/mcpl-abs-export.safetensors").exists()


def test_export_never_overwrites_silently_and_force_never_writes_through_a_link(store, tmp_path, capsys):
    out = tmp_path / "exp"
    args = ("export", store["name"], "--format", "a1111", "--out", str(out), "--name", "pet")
    assert registry(store["uri"], *args) == 0
    target = out / "pet.safetensors"
    first = vectors(target)
    target.write_bytes(b"my own file")
    assert registry(store["uri"], *args) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert target.read_bytes() == b"my own file"
    assert registry(store["uri"], *args, "--force") == 0 and vectors(target) == first

    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"secret")
    target.unlink()
    os.symlink(secret, target)
    assert registry(store["uri"], *args) == 2  # a dangling or live link counts as "exists"
    assert registry(store["uri"], *args, "--force") == 0
    assert secret.read_bytes() == b"secret" and not target.is_symlink() and vectors(target) == first
    assert sorted(p.name for p in out.iterdir()) == ["pet.safetensors"]  # no temporary folder left behind


def vectors(path: Path) -> list:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return fh.get_tensor("emb_params").tolist()


def test_default_export_name_is_the_registry_name_made_safe():
    from mcpl.pipeline.registry.refs import export_stem

    assert export_stem(None, "pets.images-a.dog") == "pets.images-a.dog"
    assert export_stem(None, "../../evil") == "evil"
    assert export_stem(None, "a/b\x1b[31m") == "a-b-31m"
    assert export_stem(None, "...") == "concept"
    assert export_stem("pet.safetensors") == "pet"


# ------------------------------------------------------------------------- tampered bundles
def tamper(store, tmp_path, edit) -> tuple[Path, Path]:
    """A copy of the batch whose job.json `edit(record, bundle folder)` changes; plus a sentinel folder."""
    batch = make_batch(store["bundle"], tmp_path / "batch")
    folder = next((batch / "jobs").iterdir())
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    shutil.copyfile(folder / "concepts" / "c1" / "learned_embeds.safetensors", outside / "learned_embeds.safetensors")
    record = json.loads((folder / "job.json").read_text())
    edit(record, folder, outside)
    (folder / "job.json").write_text(json.dumps(record))
    return batch, outside


def _file(value):
    def edit(record, folder, outside):
        record["concepts"][0]["file"] = value
    return edit


def _name(value):
    def edit(record, folder, outside):
        record["concepts"][0]["name"] = value
    return edit


def _sample(value):
    def edit(record, folder, outside):
        record["samples"] = {record["concepts"][0]["name"]: {"file": value}}
    return edit


def _overlay(value):
    def edit(record, folder, outside):
        (folder / "concepts" / record["concepts"][0]["name"] / "overlay.png").unlink()
        record["images"][0]["overlay"] = value
    return edit


def _link(rel, target):
    def edit(record, folder, outside):
        path = folder / "concepts" / "c1" / rel
        path.unlink(missing_ok=True)
        os.symlink(target(outside) if callable(target) else target, path)
    return edit


def _summary(jobs):
    def edit(record, folder, outside):
        (folder.parent.parent / "summary.json").write_text(json.dumps({"jobs": jobs}))
    return edit


def _concepts(value):
    def edit(record, folder, outside):
        record["concepts"] = value
    return edit


TAMPERED = [
    ("file-outside", _file("../../../outside/learned_embeds.safetensors"), "leaves the bundle"),
    ("file-absolute", _file("/etc/passwd"), "leaves the bundle"),
    ("file-is-job-json", _file("job.json"), "names the file 'job.json'"),
    ("file-of-another-concept", _file("concepts/c2/learned_embeds.safetensors"), "names the file"),
    ("file-nul", _file("concepts/c1/\x00"), "bad path"),
    ("file-number", _file(5), "bad path 5"),
    ("name-dotdot", _name(".."), "is not a plain folder name"),
    ("name-traversal", _name("../../outside"), "is not a plain folder name"),
    ("sample-outside", _sample("../../../outside/secret.txt"), "leaves the bundle"),
    ("overlay-absolute", _overlay("/etc/passwd"), "leaves the bundle"),
    ("link-to-outside-file", _link("extra.bin", lambda o: o / "secret.txt"), "outside the bundle; refusing"),
    ("link-to-outside-folder", _link("more", lambda o: o), "outside the bundle; refusing"),
    ("summary-out-dir-up", _summary([{"status": "done", "out_dir": "../.."}]), "leaves the bundle"),
    ("summary-out-dir-absolute", _summary([{"status": "done", "out_dir": "/tmp"}]), "leaves the bundle"),
    ("summary-jobs-not-a-list", _summary({"a": 1}), "has no list of jobs"),
    ("summary-jobs-strings", _summary(["jobs/x"]), "has no list of jobs"),
    ("concepts-strings", _concepts(["c1"]), "job.json is incomplete or malformed"),
]


@pytest.mark.parametrize("edit, message", [t[1:] for t in TAMPERED], ids=[t[0] for t in TAMPERED])
def test_tampered_bundle_is_refused_and_nothing_outside_changes(store, tmp_path, capsys, edit, message):
    batch, outside = tamper(store, tmp_path, edit)
    before = snapshot(outside)
    assert registry(store["uri"], "build", str(batch), "--no-snapshot") == 2  # refused before anything is published
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert snapshot(outside) == before


def test_cards_never_write_through_a_symlink(store, tmp_path):
    """sample.png / overlay.png of a card that are links (inside the bundle) are replaced, not followed."""
    from mcpl.job.cards import concept_cards

    batch, outside = tamper(store, tmp_path, _link("sample.png", "../../job.json"))
    folder = next((batch / "jobs").iterdir())
    job = (folder / "job.json").read_bytes()
    concept_cards(folder)
    assert (folder / "job.json").read_bytes() == job
    sample = folder / "concepts" / "c1" / "sample.png"
    assert not sample.is_symlink() and sample.read_bytes()[:4] == b"\x89PNG"


def test_evaluate_refuses_a_tampered_summary(store, tmp_path):
    from mcpl.pipeline.report import evaluate_batch

    batch, outside = tamper(store, tmp_path, _summary([{"job_id": "x", "status": "done", "rows": [1],
                                                         "images": [], "group": None, "out_dir": "../../outside"}]))
    before = snapshot(outside)
    with pytest.raises(BundleError, match="leaves the bundle"):
        evaluate_batch(batch, tmp_path / "eval")
    assert snapshot(outside) == before


def test_find_bundles_stays_inside_its_root(tmp_path):
    from mcpl.job.bundle import find_bundles

    (tmp_path / "elsewhere" / "job").mkdir(parents=True)
    (tmp_path / "elsewhere" / "job" / "job.json").write_text("{}")
    (tmp_path / "root" / "jobs").mkdir(parents=True)
    os.symlink(tmp_path / "elsewhere", tmp_path / "root" / "jobs" / "linked")
    assert find_bundles(tmp_path / "root") == []


# ----------------------------------------------------------------- registry text on a terminal
def test_show_and_list_escape_control_characters_in_registry_text(store, capsys):
    """Registry entries written before validation refused control characters are shown escaped."""
    from mcpl.pipeline.tracking.store import client_for

    client = client_for(store["uri"])
    version = client.search_model_versions(f"name = '{store['name']}'")[0].version
    client.set_model_version_tag(store["name"], version, "sentence", "a \x1b[2J\x1b[31m<c1> \u202eevil\x07")
    client.set_model_version_tag(store["name"], version, "source_image", "\x1b]0;owned\x07.png")
    for args in (("show", store["name"]), ("list",)):
        assert registry(store["uri"], *args) == 0
        out = capsys.readouterr().out
        assert not {ch for ch in out if ch != "\n" and not (ch.isprintable() or ch == " ")}, out
    assert registry(store["uri"], "show", store["name"]) == 0
    assert "\\x1b[2J" in capsys.readouterr().out


# ------------------------------------------------------------------------- MLflow down
def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_server():
    """A server that accepts connections and never answers (a hung MLflow, a firewall that drops)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    held, stop = [], threading.Event()

    def accept():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join()
    for c in held:
        c.close()
    sock.close()


def spooled_batch(store, tmp_path) -> Path:
    batch = make_batch(store["bundle"], tmp_path / "batch")
    ops = batch / "mlflow-spool" / "ops"
    ops.mkdir(parents=True)
    (ops / "batch-x.jsonl").write_text(json.dumps({"op": "create_run", "name": "b", "tags": {}, "parent": None,
                                                   "start": 1}) + "\n")
    return batch


COMMANDS = [("list",), ("show", "a.b.c"), ("export", "a.b.c", "--out", "{tmp}/exp"), ("load", "a.b.c", "--prompt", "x"),
            ("build", "{batch}"), ("build", "{spooled}")]


CASES = [("dead", c) for c in COMMANDS] + [("silent", COMMANDS[i]) for i in (0, 3, 5)]  # list, load, spooled build


@pytest.mark.parametrize("server, command", CASES, ids=[f"{s}-{' '.join(c[:2])}" for s, c in CASES])
def test_registry_fails_fast_when_mlflow_is_unreachable(store, tmp_path, capsys, silent_server, server, command):
    uri = f"http://127.0.0.1:{dead_port()}" if server == "dead" else silent_server
    names = {"tmp": str(tmp_path), "batch": str(make_batch(store["bundle"], tmp_path / "b")),
             "spooled": str(spooled_batch(store, tmp_path))}
    args = [a.format(**names) for a in command]
    started = time.monotonic()
    code = registry(uri, *args)
    took = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 3, err
    assert took < 30, took
    assert "unreachable" in err and "Traceback" not in err
    assert not (tmp_path / "exp").exists()


def test_unreachable_is_never_read_as_a_free_name():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    from mcpl.pipeline.registry.publish import _unique_name

    class Card:
        name, source_key = "ds.img.dog", "abcdef123456"

    class Down:
        def get_registered_model(self, name):
            raise MlflowException("API request to http://127.0.0.1:1/api/2.0/mlflow/registered-models/get failed "
                                  "with exception HTTPConnectionPool: Max retries exceeded")

    class Free:
        def get_registered_model(self, name):
            raise MlflowException(f"Registered Model with name={name} not found", RESOURCE_DOES_NOT_EXIST)

    with pytest.raises(MlflowException, match="API request"):
        _unique_name(Down(), Card())
    assert _unique_name(Free(), Card()) == "ds.img.dog"


def test_a_server_lost_mid_command_is_exit_3_not_a_traceback(monkeypatch, capsys):
    from mlflow.exceptions import MlflowException

    from mcpl.pipeline.registry import refs

    def lost(*args, **kwargs):
        raise MlflowException("API request to http://127.0.0.1:5000/api/2.0/mlflow/registered-models/search failed "
                              "with exception ConnectionError('Connection aborted.')")

    monkeypatch.setattr(refs, "list_concepts", lost)
    monkeypatch.setattr(refs, "show", lost)
    assert registry("sqlite:////nonexistent/x.db", "list") == 3
    assert registry("sqlite:////nonexistent/x.db", "show", "a.b.c") == 3
    err = capsys.readouterr().err
    assert err.count("error: MLflow at sqlite:////nonexistent/x.db is unreachable") == 2 and "Traceback" not in err
