"""Publish learned concepts: each concept a registered model, a new version per training.

Each training of a concept is a version (source: the job run's `concepts/<concept>/`
folder: the embedding, its overlay and sample pictures, `concept.json`); a version
carries the embedding file's sha256 and publishing the same file again adds nothing.
Should two different sources still collide on a name (mcpl.job.cards.registry_name),
the newcomer gets `-<source hash>` after its source part. Aliases: one per strategy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mcpl.concepts.embeddings import EMBEDS_FILE
from mcpl.errors import MCPLError
from mcpl.job.bundle import CARD_FILE, JOB_FILE, Bundle, find_bundles, inside
from mcpl.job.cards import ConceptCard, concept_cards
from mcpl.pipeline.registry.refs import SNAPSHOT_MODEL
from mcpl.pipeline.registry.snapshot import publish_snapshot
from mcpl.pipeline.report import BatchSummary
from mcpl.pipeline.runner import Observer
from mcpl.pipeline.tracking.observer import MlflowObserver
from mcpl.pipeline.tracking.store import client_for, experiment_id

STRATEGY_ALIASES = ("one", "all", "diverse")


@dataclass
class PublishReport:
    created: list[tuple[str, str]] = field(default_factory=list)  # (name, version)
    unchanged: list[tuple[str, str]] = field(default_factory=list)
    snapshot_version: str | None = None
    snapshot_changed: bool = False

    def message(self) -> str:
        snap = (f"snapshot {SNAPSHOT_MODEL} v{self.snapshot_version}" + (" (new)" if self.snapshot_changed else "")
                if self.snapshot_version else "no snapshot")
        return f"registry: {len(self.created)} new version(s), {len(self.unchanged)} unchanged; {snap}"

    def to_dict(self) -> dict:
        return {"created": [f"{n}/{v}" for n, v in self.created],
                "unchanged": [f"{n}/{v}" for n, v in self.unchanged],
                "snapshot_version": self.snapshot_version, "snapshot_changed": self.snapshot_changed,
                "message": self.message()}


def _job_run(client, experiment: str, card: ConceptCard, run_ids: dict[str, str]) -> str:
    """The run holding the job's concept folders: the tracked job run, else a new publish run."""
    run_id = run_ids.get(card.job_id)
    if run_id is None:
        exp = experiment_id(client, experiment)
        runs = client.search_runs([exp], f"tags.`mcpl.job_id` = '{card.job_id}' and attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        run_id = runs[0].info.run_id if runs else None
    if run_id is None:
        exp = experiment_id(client, experiment)
        run = client.create_run(exp, run_name=f"publish {card.job_id[:8]}",
                                tags={"mcpl.kind": "job", "mcpl.job_id": card.job_id,
                                      "mcpl.strategy": card.strategy, "mcpl.base_model_hash": card.base_model_hash})
        run_id = run.info.run_id
        client.log_artifacts(run_id, str(card.folder.parent), "concepts")
        client.log_artifact(run_id, str(card.folder.parent.parent / JOB_FILE))
        client.set_terminated(run_id)
    run_ids[card.job_id] = run_id
    present = {Path(f.path).name for f in client.list_artifacts(run_id, f"concepts/{card.concept}")}
    if not {EMBEDS_FILE, CARD_FILE} <= present:  # a run logged before the cards existed
        client.log_artifacts(run_id, str(card.folder), f"concepts/{card.concept}")
    return run_id


def _unique_name(client, card: ConceptCard) -> str:
    """The card's name, or name-with-source-hash if that name belongs to other images."""
    from mlflow.exceptions import MlflowException

    for name in (card.name, _suffixed(card)):
        try:
            model = client.get_registered_model(name)
        except MlflowException as err:
            if getattr(err, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise  # an unreachable or failing store is never "the name is free"
            return name
        if model.tags.get("source_key") in (None, card.source_key):
            return name
    return _suffixed(card)


def _suffixed(card: ConceptCard) -> str:
    dataset, _, rest = card.name.partition(".")
    source, _, concept = rest.rpartition(".")
    return f"{dataset}.{source}-{card.source_key[:6]}.{concept}"


def publish(cards: Iterable[ConceptCard], uri: str | None = None, experiment: str = "mcpl",
            run_ids: dict[str, str] | None = None, snapshot: bool = True, client=None) -> PublishReport:
    """Register each card as a new version of its concept unless that exact file is registered."""
    from mlflow.exceptions import MlflowException

    client = client or client_for(uri)
    run_ids = dict(run_ids or {})
    report = PublishReport()
    for card in cards:
        name = _unique_name(client, card)
        card.name = name
        try:
            client.create_registered_model(name, tags=card.model_tags(), description=card.description())
        except MlflowException as err:
            if getattr(err, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
        versions = client.search_model_versions(f"name = '{name}'")
        same = [v for v in versions if v.tags.get("sha256") == card.sha256]
        if same:
            report.unchanged.append((name, str(same[0].version)))
            continue
        run_id = _job_run(client, experiment, card, run_ids)
        source = f"{client.get_run(run_id).info.artifact_uri}/concepts/{card.concept}"
        version = client.create_model_version(name, source=source, run_id=run_id, tags=card.tags(),
                                              description=card.description(run_id), await_creation_for=0)
        client.update_registered_model(name, description=card.description(run_id))  # the Models page: newest picture
        if card.strategy in STRATEGY_ALIASES:
            client.set_registered_model_alias(name, card.strategy, version.version)
        report.created.append((name, str(version.version)))
    if snapshot:
        report.snapshot_version, report.snapshot_changed = publish_snapshot(client, experiment)
    return report



def publish_bundles(root: str | Path, uri: str | None = None, experiment: str = "mcpl",
                    run_ids: dict[str, str] | None = None, snapshot: bool = True) -> PublishReport:
    """Cards for every bundle under `root` (a batch folder: the jobs its summary lists), then `publish` them."""
    cards = [c for b in find_bundles(root) for c in concept_cards(b)]
    return publish(cards, uri, experiment, run_ids, snapshot)


class RegistryObserver(Observer):
    """After a batch, publishes the concepts of its finished jobs (versions point at their MLflow runs).

    Runs before MlflowObserver.batch_finished, so the batch's summary says what was published.
    If MLflow is unreachable the bundles stay safe and the summary says how to publish later.
    """

    def __init__(self, mlflow: MlflowObserver, experiment: str | None = None) -> None:
        self.mlflow = mlflow
        self.experiment = experiment or mlflow.tracker.experiment

    def batch_finished(self, summary: BatchSummary) -> None:
        done = [o for o in summary.jobs if o.ok]
        if not done:
            summary.registry = {"message": "registry: nothing to publish (no finished job)"}
            return
        pending = self.mlflow.tracker.finish().pending
        later = f"run `mcpl registry build {summary.out_root}` to publish"
        if pending:
            summary.registry = {"message": f"registry not published: MLflow unreachable ({pending} call(s) "
                                           f"spooled); {later} when it is back", "pending": True}
            return
        run_ids = self.mlflow.run_ids()
        try:
            cards = [c for o in done for c in concept_cards(Bundle(inside(summary.out_root, o.out_dir)))]
            report = publish(cards, self.mlflow.tracker.uri, self.experiment,
                             {o.job_id: run_ids[o.job_id] for o in done if o.job_id in run_ids})
        except (MCPLError, OSError) as err:
            summary.registry = {"message": f"registry not published ({err}); {later}", "pending": True}
            return
        except Exception as err:  # MLflow raises many kinds; the bundles are safe either way
            summary.registry = {"message": f"registry not published ({type(err).__name__}: {str(err)[:300]}); "
                                           f"{later}", "pending": True}
            return
        summary.registry = report.to_dict()
