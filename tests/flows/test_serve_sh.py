"""`bash scripts/serve.sh`, then what a user types in another shell in the project folder:
`prefect deployment run mcpl/batch --watch` and `mcpl registry list` (real servers, non-default ports).

Proves: the served batch reaches this server without any exported variable or global profile
(./prefect.toml), --watch shows the job's progress lines and the batch's outcome, the batch
trains full MCPL (the DVC pipeline's defaults), `mcpl registry list` finds the served MLflow
(./.mcpl/tracking_uri) and lists the run's concepts without creating ./mlflow.db, and Ctrl-C
removes both pointers.
"""

from __future__ import annotations

import json
import urllib.request

from helpers.servers import BIN

pytest_plugins = ("helpers.server_fixtures",)


def test_watch_shows_progress_and_the_outcome(served_run):
    watch = served_run["watch"]
    assert "Completed" in watch
    assert "step 4/4" in watch  # the job's progress lines, streamed while it trains
    assert "2 job(s): 2 trained" in watch  # the batch's final message, not just a state
    for noise in ("Downloading artifacts", "Loading weights", "Waiting up to 300", "resumed from step 0"):
        assert noise not in watch


def test_the_served_batch_trains_the_pipelines_defaults(served_run, serve_sh):
    summary = served_run["summary"]
    assert summary["counts"]["done"] == 2 and summary["registry"]["created"]
    job = serve_sh.project / "runs" / "toy" / summary["jobs"][0]["out_dir"] / "job.json"
    config = json.loads(job.read_text())["config"]
    assert config["attn_mask"] and config["prompt_cl"] and config["bind_adj"]  # full MCPL, as params.yaml


def test_registry_list_after_serve_sh_lists_the_runs_concepts(served_run, serve_sh):
    assert (serve_sh.project / ".mcpl" / "tracking_uri").read_text().strip() == serve_sh.mlflow_uri
    listed = serve_sh.run([str(BIN / "mcpl"), "registry", "list"], timeout=120)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    for name in served_run["concepts"]:
        assert name in listed.stdout, listed.stdout
    assert "no concepts registered" not in listed.stdout
    assert not (serve_sh.project / "mlflow.db").exists()  # reading never creates a store


def test_settings_stay_in_the_project(serve_sh):
    with urllib.request.urlopen(f"{serve_sh.prefect_ui}/ui-settings", timeout=10) as r:
        assert json.load(r)["api_url"] == f"{serve_sh.prefect_ui}/api"  # the UI talks to this port, not :4200
    assert f"{serve_sh.prefect_ui}/api" in (serve_sh.project / "prefect.toml").read_text()
    profiles = serve_sh.home / ".prefect" / "profiles.toml"
    assert not profiles.exists() or str(serve_sh.prefect_port) not in profiles.read_text()


def test_ctrl_c_removes_the_pointers(serve_sh):
    """Last: stops serve.sh (a later test that needs it starts it again on the same stores)."""
    serve_sh.stop()
    assert not (serve_sh.project / ".mcpl" / "tracking_uri").exists()
    assert not (serve_sh.project / "prefect.toml").exists()
    after = serve_sh.run([str(BIN / "mcpl"), "registry", "list"], timeout=120)
    assert after.returncode == 3 and "no MLflow store" in after.stderr, after.stdout + after.stderr
    assert not (serve_sh.project / "mlflow.db").exists()
