"""Concept cards: each learned concept of a finished bundle, described as the registry shows it.

A card's folder (`concepts/<name>/`) is self-describing: the embedding, `concept.json`,
the concept's own attention overlay and a sample generation. Names are
`<dataset>.<source>.<concept>`: the dataset folder's name, the image path relative to it
without extension (`/` -> `-`) or the MCPL-diverse group's name, and the concept's name
(`dog` for `<dog>`), e.g. `example.images-scene_0.circle`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

from mcpl.concepts.embeddings import EMBEDS_FILE
from mcpl.errors import BundleError
from mcpl.job.bundle import CARD_FILE, OVERLAY_FILE, SAMPLE_FILE, Bundle, write_json

REGULARISERS = ("attn_mask", "prompt_cl", "bind_adj")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def registry_name(dataset: str, source: str, concept: str) -> str:
    """`<dataset>.<source>.<concept>`, each part reduced to letters, digits, `_` and `-`."""
    return ".".join(_slug(p) for p in (dataset, re.sub(r"\.[A-Za-z0-9]+$", "", source).replace("/", "-"), concept))


def method_label(config: dict) -> str:
    """Which regularisers trained a concept: `plain`, `full`, or e.g. `attn_mask+prompt_cl`."""
    on = [r for r in REGULARISERS if config.get(r)]
    return "plain" if not on else "full" if len(on) == len(REGULARISERS) else "+".join(on)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class ConceptCard:
    """One learned concept of one job bundle, with everything the registry shows about it."""

    name: str
    token: str
    concept: str
    job_id: str
    folder: Path  # <job>/concepts/<concept>/
    sha256: str
    dataset: str
    source: str
    source_key: str  # hash of the training images: a name means one set of images
    images: list[str]
    sentences: list[str]
    initializer: str
    adjective: str
    strategy: str
    base_model: str
    base_model_hash: str
    config_hash: str
    steps: int
    method: str = "plain"  # which regularisers were on (method_label)
    metrics: dict[str, float] = field(default_factory=dict)
    family: str = "sd"  # model family (sd, sdxl, ldm): a concept loads only into its family
    widths: list[int] = field(default_factory=list)  # embedding width per text encoder

    @property
    def file(self) -> Path:
        return self.folder / EMBEDS_FILE

    def tags(self) -> dict[str, str]:
        """Version tags (plain keys, so the MLflow UI search `tags.concept = 'dog'` works)."""
        tags = {"token": self.token, "concept": self.concept, "dataset": self.dataset, "source": self.source,
                "source_image": ",".join(self.images), "sentence": " | ".join(self.sentences),
                "initializer": self.initializer, "adjective": self.adjective, "strategy": self.strategy,
                "method": self.method, "family": self.family, "widths": ",".join(map(str, self.widths)),
                "base_model": self.base_model, "base_model_hash": self.base_model_hash,
                "config_hash": self.config_hash, "job_id": self.job_id, "sha256": self.sha256,
                "steps": str(self.steps)}
        tags.update({f"metric.{k}": f"{v:.6g}" for k, v in self.metrics.items()})
        return tags

    def model_tags(self) -> dict[str, str]:
        return {"kind": "mcpl-concept", "token": self.token, "concept": self.concept, "dataset": self.dataset,
                "source": self.source, "source_key": self.source_key}

    def description(self, run_id: str | None = None) -> str:
        """Markdown (the MLflow UI renders it): code spans keep `<token>` visible. With the MLflow run that
        holds this card's folder, the concept's overlay and sample are shown inline (links relative to the
        UI's own address, so they work on any host and port, `mlflow ui` included)."""
        sentences = "; ".join(f"`{s}`" for s in self.sentences)
        text = (f"Concept `{self.token}` learned from {', '.join(self.images)} (dataset {self.dataset}, strategy "
                f"{self.strategy}, {self.method}): {sentences}. Load it with `mcpl registry load {self.name}` or "
                f"`models:/{self.name}@latest`.")
        if not run_id:
            return text
        pictures = [f"![{label} of {self.concept}](get-artifact?path={quote(f'concepts/{self.concept}/{file}')}"
                    f"&run_uuid={quote(run_id)})" for label, file in (("attention", OVERLAY_FILE),
                                                                     ("sample", SAMPLE_FILE))
                    if (self.folder / file).is_file()]
        return text + ("\n\n" + " ".join(pictures) if pictures else "")

    def to_dict(self) -> dict:
        data = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
        data["folder"] = f"concepts/{self.concept}"
        return data


def _concept_file(bundle: Bundle, name: object, file: object) -> Path:
    """A record's concept file, which must be this bundle's `concepts/<name>/learned_embeds.safetensors`.

    The registry publishes the card's folder and its parent (`concepts/`): a tampered
    job.json naming any other file (`job.json`, `../x`, another concept's) would make it
    publish, or write cards into, some other folder.
    """
    if not isinstance(name, str) or name in ("", ".", "..") or any(ch in name for ch in "/\\\0"):
        raise BundleError(f"concept name {name!r} in {bundle.job_file} is not a plain folder name; "
                          "the bundle was tampered with")
    path = bundle.file(file)
    expected = bundle.concept_folder(name) / EMBEDS_FILE
    if path != expected or path.parent.parent != bundle.concepts_dir.resolve():
        raise BundleError(f"concept {name!r} in {bundle.job_file} names the file {file!r}, not "
                          f"{Bundle.concept_rel(name)}; the bundle was tampered with")
    return path


def _check_tree(bundle: Bundle) -> None:
    """No symlink under `concepts/` may lead out of the bundle (publishing copies what links point to)."""
    base = bundle.path.resolve()
    for folder, dirs, files in os.walk(bundle.concepts_dir):
        for entry in dirs + files:
            path = Path(folder) / entry
            if path.is_symlink() and not path.resolve().is_relative_to(base):
                raise BundleError(f"{path} is a symlink to {path.resolve()}, outside the bundle; refusing to "
                                  "publish it")


def _copy_into(src: Path, dst: Path) -> None:
    """Copy a file to `dst` by writing beside it and renaming: a symlink at `dst` is replaced, never followed."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as fh:
            shutil.copyfileobj(fh, out)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def concept_cards(bundle: Bundle | str | Path) -> list[ConceptCard]:
    """Read a finished bundle and write each concept's card files next to its embedding.

    `concepts/<name>/` gets `concept.json` and `sample.png` (a generation); its own
    `overlay.png` is written by the job. Idempotent. Every path read from the bundle's
    records is resolved inside the bundle, and each concept file must be in its own
    `concepts/<name>/` folder (`_concept_file`); nothing is written through a symlink.
    """
    bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    record, spec = bundle.record(), bundle.spec()
    if not isinstance(spec, dict):
        raise BundleError(f"{bundle.spec_file} is not a JSON object; the bundle was tampered with")
    _check_tree(bundle)
    dataset = Path(spec["dataset"]).name if spec.get("dataset") else "adhoc"
    images = [i.source or i.hash for i in record.images]
    source = spec.get("group") or (images[0] if len(images) == 1 else "group-" + record.job_id[:8])
    source_key = hashlib.sha256(",".join(sorted(i.hash for i in record.images)).encode()).hexdigest()[:12]
    cards = []
    for c in record.concepts:
        embeds = _concept_file(bundle, c.name, c.file)
        folder = embeds.parent
        shown = record.images_of(c)
        if not os.path.lexists(folder / OVERLAY_FILE):  # bundles written before concepts had their own overlay
            overlay = bundle.file(shown[0].overlay)
            if overlay.is_file():
                _copy_into(overlay, folder / OVERLAY_FILE)
        sample = record.samples.get(c.name) if isinstance(record.samples, dict) else None
        sample_rel = sample.get("file") if isinstance(sample, dict) else None
        if sample_rel and bundle.file(sample_rel).is_file():
            _copy_into(bundle.file(sample_rel), folder / SAMPLE_FILE)
        metrics = {}
        for image_key, per_token in record.metrics.items():
            values = per_token.get(c.token) if isinstance(per_token, dict) else None
            for metric, value in (values or {}).items():
                if isinstance(value, int | float):
                    metrics[f"{image_key}.{metric}"] = float(value)
        metrics["final_loss"] = float(record.final_loss)
        card = ConceptCard(
            name=registry_name(dataset, source, c.name), token=c.token, concept=c.name, job_id=record.job_id,
            folder=folder, sha256=file_sha256(embeds), dataset=dataset, source=source, source_key=source_key,
            images=[i.source or i.hash for i in shown], sentences=[i.sentence for i in shown],
            initializer=c.initializer or "", adjective=c.adjective or "", strategy=record.strategy,
            base_model=record.base_model, base_model_hash=record.base_model_hash, config_hash=record.config_hash,
            steps=int(record.steps), method=method_label(record.config), metrics=metrics, family=record.family,
            widths=list(record.widths))
        write_json(folder / CARD_FILE, card.to_dict())
        cards.append(card)
    return cards
