"""Jobs per hour: packed jobs, worker fan-out, and mcpl against its peer, all measured in one run.

Sections (CPU, `benchmarks/results/throughput.json`):

  packing  K jobs packed into one UNet call per step vs the same K jobs one after another, in one
           process on the toy model (`mcpl.job.run.run_jobs`: the whole job, bundle included,
           no samples). K = 1 is the control (the same path both ways).
  fanout   `run_batch(..., workers=2, pack=1)` vs `workers=1` on the same N jobs. Efficiency =
           (T_serial / N * N / 2) / T_parallel, twice: "with start-up" (wall time of each
           run_batch call: worker spawn, imports and model loads included, the serial run's one
           in-process model load too) and "steady" (from each job's spec.json to its outcome.json:
           per worker, first job start to last job end; start-up excluded). Next to it, the
           machine's own ceiling: the same efficiency for a fixed torch loop in 1 vs 2 processes.
  peer     mcpl (MCPL-one without regularisers, and full MCPL) against the peer, our re-implementation
           of diffusers' textual-inversion example loop (benchmarks/peer_ti.py), at equal steps,
           batch, image and model, in jobs per hour (a job = setup + steps, models already loaded;
           mcpl's bundle export and the peer's file save are left out of both). On the toy model
           (plus 4 mcpl jobs packed) and on SD 1.5's architecture (random weights, CLIP's 49,408-row
           table, since the peer's optimiser works on the whole table).

Every figure is the median over `rounds` with min/max; variants alternate order round by round,
so a busy machine slows all of them alike. Each section reports wall time (what a user waits for)
and process CPU time (the work itself; on this shared 2-core machine other jobs take a varying
share of the cores, CPU time does not see that).

    python benchmarks/throughput.py                 # everything (~25 min on the busy 2-core machine)
    python benchmarks/throughput.py --quick         # smoke: tiny sizes, < 2 min, writes to a temp folder
    python benchmarks/throughput.py --sections peer --peer-models sd15

GPU suite (run by benchmarks/gpu.sh; `--device cpu --quick` rehearses it on tiny models):

    python benchmarks/throughput.py --suite gpu --device cuda --budget 330 --out benchmarks/results/gpu.json

Targets (issue 13): packed >= 1.5x at K = 4 on CPU (toy model), >= 2x on GPU; fan-out >= 0.9;
mcpl >= 1.5x the peer.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
ROOT = HERE.parent
RESULTS = HERE / "results"
OUT = RESULTS / "throughput.json"
CLIP_VOCAB = 49408  # rows of SD 1.x's CLIP token table
SD15_SENTENCE = "a photo of a red <c1|object|red> and a blue <c2|thing|blue>"
TARGETS = {"packed_cpu_k4": 1.5, "packed_gpu_k4": 2.0, "fanout": 0.9, "peer": 1.5}

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from mcpl.config import RunOptions, TrainConfig  # noqa: E402
from mcpl.method.inputs import JobInput  # noqa: E402


# ---------------------------------------------------------------------------- helpers
def spread(values: Sequence[float], digits: int = 3) -> dict:
    """Median with min/max and n."""
    values = list(values)
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "n": len(values)}


@dataclasses.dataclass
class Timing:
    wall: float = 0.0
    cpu: float = 0.0


@contextlib.contextmanager
def timed() -> Iterator[Timing]:
    """Wall and process CPU seconds of the block (CPU time: this process's threads only)."""
    t = Timing()
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield t
    finally:
        t.wall, t.cpu = time.perf_counter() - wall, time.process_time() - cpu


def alternate(items: Sequence, round_index: int) -> list:
    """The items, rotated by the round (each variant goes first in turn)."""
    k = round_index % len(items)
    return list(items[k:]) + list(items[:k])


def git_rev() -> str:
    """The code measured: THROUGHPUT_CODE_REV when run from an exported snapshot (no .git), else git's HEAD."""
    if os.environ.get("THROUGHPUT_CODE_REV"):
        return os.environ["THROUGHPUT_CODE_REV"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "git_rev": git_rev(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "load_average_start": [round(x, 2) for x in os.getloadavg()]}


def toy_jobs(n: int, seed: int = 1000) -> list[tuple[Image.Image, str]]:
    """n two-object toy scenes of held-out colour-shape pairs, each with its coloured sentence
    ('a red <obj1|object|red> and a blue <obj2|object|blue>'), as the toy benchmark trains them."""
    from mcpl.toyworld.render import HELDOUT_PAIRS, render, sample_scene

    pairs = [(a, b) for i, a in enumerate(HELDOUT_PAIRS) for b in HELDOUT_PAIRS[i + 1:]]
    jobs = []
    for k in range(n):
        rendered = render(sample_scene(seed + k, forced=list(pairs[k % len(pairs)])))
        text = " and ".join(f"a {o.colour} <obj{j}|object|{o.colour}>"
                            for j, o in enumerate(rendered.scene.objects, start=1))
        jobs.append((Image.fromarray(rendered.image), text))
    return jobs


def two_squares(side: int) -> Image.Image:
    image = Image.new("RGB", (side, side), "white")
    image.paste((220, 30, 30), (side // 8, side // 8, side // 2, side // 2))
    image.paste((30, 60, 220), (side // 2, side // 2, side - side // 8, side - side // 8))
    return image


def job_config(steps: int, seed: int, full: bool, batch: int = 4, **extra) -> TrainConfig:
    fields = {"steps": steps, "seed": seed, "batch_size": batch, **extra}
    return TrainConfig.full_mcpl(**fields) if full else TrainConfig(**fields)


def with_clip_vocab(components, rows: int = CLIP_VOCAB):
    """SD 1.5's CLIP table size on an architecture built with a small test vocabulary.

    The tokenizer gets filler entries in its BPE vocabulary (never produced by any text) and the
    encoder's table grows to match, so the first new token gets id 49,408 as in the real model and
    whole-table work (the peer's dense gradient, AdamW and row restore) is the real size.
    """
    from transformers import CLIPTokenizer

    stack = components.stacks[0]
    folder = Path(tempfile.mkdtemp(prefix="clipvocab-"))
    stack.tokenizer.save_pretrained(folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), rows):
        vocab[f"<|unused{i}|>"] = i
    (folder / "tokenizer.json").write_text(json.dumps(data))
    for name in ("vocab.json",):
        if (folder / name).exists():
            (folder / name).write_text(json.dumps(vocab))
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    if len(tokenizer) != rows:
        raise RuntimeError(f"padded tokenizer has {len(tokenizer)} tokens, expected {rows}")
    stack.encoder.resize_token_embeddings(rows, mean_resizing=False)
    stack.encoder.requires_grad_(False)
    components.stacks[0] = dataclasses.replace(stack, tokenizer=tokenizer)
    return components


class Partial:
    """The report, rewritten after every measurement (an interrupted run keeps what it measured)."""

    def __init__(self, out: Path, report: dict) -> None:
        self.out, self.report = out, report
        self.started = time.time()

    def write(self, done: bool = False) -> None:
        self.report["partial"] = not done
        self.report["elapsed_s"] = round(time.time() - self.started, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.report, indent=1))
        tmp.replace(self.out)


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


# ---------------------------------------------------------------------------- packing
def packing_section(components, ks: Sequence[int], steps: int, rounds: int, scratch: Path,
                    save: Callable[[dict], None]) -> dict:
    """K jobs packed (one run_jobs call) vs the same K jobs one run_jobs call each, in this process."""
    from mcpl.job.run import JobWork, run_jobs

    jobs = toy_jobs(max(ks))
    options = RunOptions(device="cpu", samples=0, progress=False, log=False, threads=1)
    runs: dict[int, dict[str, list[dict]]] = {k: {"sequential": [], "packed": []} for k in ks}
    result: dict = {"model": "models/toyworld (32 px)", "variant": "full MCPL (AttnMask + PromptCL + Bind adj)",
                    "steps": steps, "batch_size": 4, "rounds": rounds, "ks": list(ks),
                    "what": "whole jobs through mcpl.job.run.run_jobs (training, maps, overlays, bundle; "
                            "no samples), one process, 1 thread; models loaded once before"}
    for r in range(rounds):
        for i, k in enumerate(ks):
            for mode in alternate(("sequential", "packed"), r + i):
                folder = scratch / f"pack-r{r}-k{k}-{mode}"
                works = [JobWork([JobInput.from_text(img, text)], job_config(steps, seed=j, full=True),
                                 folder / f"job{j}") for j, (img, text) in enumerate(jobs[:k])]
                with timed() as t:
                    results = ([run_jobs(components, [w], options)[0] for w in works] if mode == "sequential"
                               else run_jobs(components, works, options))
                failed = [x for x in results if isinstance(x, BaseException)]
                if failed:
                    raise RuntimeError(f"packing K={k} {mode}: {failed[0]!r}")
                train = sum(x.record.train_seconds for x in results)
                runs[k][mode].append({"wall_s": round(t.wall, 3), "cpu_s": round(t.cpu, 3), "train_s": round(train, 3)})
                shutil.rmtree(folder, ignore_errors=True)
                say(f"packing r{r} K={k} {mode}: {t.wall:.1f} s wall, {t.cpu:.1f} s cpu, {train:.1f} s steps")
            result["per_k"] = _packing_summary(runs)
            save(result)
    result["runs"] = {str(k): v for k, v in runs.items()}
    return result


def _packing_summary(runs: dict[int, dict[str, list[dict]]]) -> dict:
    out = {}
    for k, modes in runs.items():
        pairs = list(zip(modes["sequential"], modes["packed"], strict=False))
        if not pairs:
            continue
        out[str(k)] = {
            "jobs_per_hour_sequential": spread([k * 3600 / s["wall_s"] for s, _ in pairs], 1),
            "jobs_per_hour_packed": spread([k * 3600 / p["wall_s"] for _, p in pairs], 1),
            "speedup_wall": spread([s["wall_s"] / p["wall_s"] for s, p in pairs]),
            "speedup_cpu": spread([s["cpu_s"] / p["cpu_s"] for s, p in pairs]),
            "speedup_steps_only": spread([s["train_s"] / p["train_s"] for s, p in pairs]),
        }
    return out


# ----------------------------------------------------------------------------- fan-out
def _burn(seconds_hint: int) -> float:
    """A fixed torch workload on one thread (for the machine's own fan-out ceiling); returns its CPU seconds."""
    torch.set_num_threads(1)
    x = torch.randn(8, 32, 32, 32)
    w = torch.randn(32, 32, 3, 3, requires_grad=True)
    start = time.process_time()
    for _ in range(seconds_hint):
        torch.nn.functional.conv2d(x, w, padding=1).square().mean().backward()
    return time.process_time() - start


def _warm(_: int) -> int:
    torch.set_num_threads(1)
    return os.getpid()


def machine_ceiling(pool, iterations: int) -> dict:
    """Wall time of one fixed torch loop alone vs two at once on two processes: the best fan-out
    efficiency this machine allows right now (other users' processes share the cores)."""
    with timed() as one:
        pool.map(_burn, [iterations], chunksize=1)
    with timed() as two:
        pool.map(_burn, [iterations, iterations], chunksize=1)
    return {"one_s": round(one.wall, 3), "two_s": round(two.wall, 3), "efficiency": round(one.wall / two.wall, 3)}


def fanout_specs(model: str, n: int, steps: int, root: Path) -> list:
    from mcpl.job.run import inputs_job_id
    from mcpl.pipeline.data.jobs import JobSpec

    root.mkdir(parents=True, exist_ok=True)
    specs = []
    for i, (image, text) in enumerate(toy_jobs(n, seed=2000)):
        name = f"scene{i}.png"
        image.save(root / name)
        config = job_config(steps, seed=i, full=True)
        spec = JobSpec("pending", str(root), [i + 1], [name], [text], [{}], None, config, model)
        spec.job_id = inputs_job_id(spec.load_inputs(), config, model)
        specs.append(spec)
    return specs


def busy_span(out: Path, outcomes) -> tuple[float, float]:
    """(sum of per-job spans, the longest worker's first-start-to-last-end) from the bundles' files."""
    from mcpl.job.bundle import OUTCOME_FILE, SPEC_FILE, Bundle

    per_worker: dict[int, list[tuple[float, float]]] = {}
    for o in outcomes:
        bundle = Bundle.of(out, o.job_id).path
        per_worker.setdefault(o.pid, []).append(((bundle / SPEC_FILE).stat().st_mtime,
                                                 (bundle / OUTCOME_FILE).stat().st_mtime))
    jobs = sum(end - start for spans in per_worker.values() for start, end in spans)
    longest = max(max(e for _, e in spans) - min(s for s, _ in spans) for spans in per_worker.values())
    return jobs, longest


def fanout_section(model: str, n: int, steps: int, rounds: int, burn: int, scratch: Path,
                   save: Callable[[dict], None]) -> dict:
    from mcpl.pipeline.workers import run_batch

    specs = fanout_specs(model, n, steps, scratch / "fanout-data")
    options = RunOptions(device="cpu", samples=0, progress=False, log=False, threads=1)
    result: dict = {"model": "models/toyworld (32 px)", "variant": "full MCPL", "jobs": n, "steps": steps,
                    "workers": 2, "pack": 1, "rounds": rounds, "threads_per_worker": 1,
                    "efficiency_definition": "(T_serial / N) * N / 2 / T_parallel",
                    "with_startup": "wall time of run_batch(...) (workers=2: spawn, imports, model load in each "
                                    "worker; workers=1: one in-process model load)",
                    "steady": "per worker, first job's spec.json to last job's outcome.json (start-up excluded); "
                              "serial: the same span of the one process", "runs": []}
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        pool.map(_warm, [0, 1], chunksize=1)
        for r in range(rounds):
            row: dict = {}
            for mode in alternate(("serial", "parallel"), r):
                out = scratch / f"fanout-r{r}-{mode}"
                with timed() as t:
                    summary = run_batch(specs, out, options, workers=1 if mode == "serial" else 2, pack=1, log=False)
                if summary.count("done") != n:
                    raise RuntimeError(f"fan-out {mode}: {summary.render()}")
                job_sum, longest = busy_span(out, summary.jobs)
                row[mode] = {"wall_s": round(t.wall, 3), "steady_s": round(longest, 3),
                             "job_seconds_sum": round(job_sum, 3), "pids": len({o.pid for o in summary.jobs})}
                shutil.rmtree(out, ignore_errors=True)
                say(f"fan-out r{r} {mode}: {t.wall:.1f} s wall, steady {longest:.1f} s")
            row["ceiling"] = machine_ceiling(pool, burn)
            s, p = row["serial"], row["parallel"]
            row["efficiency_with_startup"] = round((s["wall_s"] / 2) / p["wall_s"], 3)
            row["efficiency_steady"] = round((s["steady_s"] / 2) / p["steady_s"], 3)
            say(f"fan-out r{r}: efficiency {row['efficiency_with_startup']} with start-up, "
                f"{row['efficiency_steady']} steady; machine ceiling {row['ceiling']['efficiency']}")
            result["runs"].append(row)
            result["summary"] = _fanout_summary(result["runs"], n)
            save(result)
    return result


def _fanout_summary(rows: list[dict], n: int) -> dict:
    return {
        "efficiency_with_startup": spread([r["efficiency_with_startup"] for r in rows]),
        "efficiency_steady": spread([r["efficiency_steady"] for r in rows]),
        "machine_ceiling": spread([r["ceiling"]["efficiency"] for r in rows]),
        "jobs_per_hour_serial": spread([n * 3600 / r["serial"]["wall_s"] for r in rows], 1),
        "jobs_per_hour_parallel": spread([n * 3600 / r["parallel"]["wall_s"] for r in rows], 1),
        "startup_s_parallel": spread([r["parallel"]["wall_s"] - r["parallel"]["steady_s"] for r in rows], 1),
    }


# -------------------------------------------------------------------------------- peer
def peer_section(components, label: str, image: Image.Image, sentence: str, steps: int, batch: int,
                 rounds: int, scratch: Path, save: Callable[[dict], None], packed: int = 0,
                 placeholder: str = "<obj1>", initializer: str = "object") -> dict:
    """mcpl-one, full MCPL (and optionally `packed` full jobs in one pack) vs the peer, job by job."""
    from peer_ti import OBJECT_TEMPLATES, PeerSettings, TextualInversionPeer

    from mcpl.method.packing import PackedJob, PackedTrainer
    from mcpl.method.trainer import MCPLTrainer

    c = components
    resolution = c.default_resolution if label == "toy" else image.width
    picture = scratch / f"peer-{label}.png"
    image.save(picture)
    hint_templates = c.hints.get("templates")
    settings = PeerSettings(placeholder=placeholder, initializer=initializer, batch_size=batch, resolution=resolution,
                            templates=tuple(hint_templates) if hint_templates else OBJECT_TEMPLATES)
    variants = ["peer", "mcpl_one", "mcpl_full"] + ([f"mcpl_full_packed{packed}"] if packed else [])
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    result: dict = {"model": label, "resolution": resolution, "steps": steps, "batch_size": batch, "rounds": rounds,
                    "sentence": sentence, "peer_placeholder": placeholder,
                    "peer_templates": "the model's own templates (toy model: '{}')" if hint_templates
                    else "the script's imagenet_templates_small",
                    "table_rows": int(c.stacks[0].encoder.get_input_embeddings().weight.shape[0]),
                    "what": "a job = setup (tokenizer copy, rows, optimiser; mcpl: latent cache) + steps; "
                            "models loaded once before; one process, 1 thread"}

    def run(variant: str, seed: int) -> tuple[Timing, Timing, int]:
        if variant == "peer":
            with timed() as setup:
                job = TextualInversionPeer(c.stacks[0].tokenizer, c.stacks[0].encoder, c.vae, c.unet, c.scheduler,
                                           [picture], dataclasses.replace(settings, seed=seed), c.dtype)
            with timed() as train:
                job.train(steps)
            job.close()
            return setup, train, 1
        full = variant != "mcpl_one"
        config = job_config(steps, seed=seed, full=full, batch=batch,
                            resolution=None if label == "toy" else resolution)
        k = packed if variant.startswith("mcpl_full_packed") else 1
        with timed() as setup:
            if k == 1:
                trainer = MCPLTrainer(c, [JobInput.from_text(image, sentence)], config, progress=False)
            else:
                trainer = PackedTrainer(c, [PackedJob([JobInput.from_text(image, sentence)],
                                                      config.model_copy(update={"seed": seed + j})) for j in range(k)])
        with timed() as train:
            out = trainer.train()
        trainer.close()
        if k > 1 and any(isinstance(x, BaseException) for x in out):
            raise RuntimeError(f"packed peer-row jobs failed: {out}")
        return setup, train, k

    for r in range(rounds):
        for variant in alternate(variants, r):
            setup, train, k = run(variant, seed=r)
            runs[variant].append({"setup_wall_s": round(setup.wall / k, 3), "setup_cpu_s": round(setup.cpu / k, 3),
                                  "train_wall_s": round(train.wall / k, 3), "train_cpu_s": round(train.cpu / k, 3),
                                  "jobs": k})
            say(f"peer {label} r{r} {variant}: {(setup.wall + train.wall) / k:.1f} s/job wall "
                f"({(setup.cpu + train.cpu) / k:.1f} s cpu)")
        result["summary"] = _peer_summary(runs, steps)
        save(result)
    result["runs"] = runs
    return result


def _peer_summary(runs: dict[str, list[dict]], steps: int) -> dict:
    def job_s(x: dict, kind: str) -> float:
        return x[f"setup_{kind}_s"] + x[f"train_{kind}_s"]

    out: dict = {}
    for variant, rows in runs.items():
        out[variant] = {"jobs_per_hour": spread([3600 / job_s(x, "wall") for x in rows], 1),
                        "ms_per_step_wall": spread([1000 * x["train_wall_s"] / steps for x in rows], 1),
                        "ms_per_step_cpu": spread([1000 * x["train_cpu_s"] / steps for x in rows], 1),
                        "setup_s_wall": spread([x["setup_wall_s"] for x in rows])}
        if variant != "peer":
            pairs = list(zip(runs["peer"], rows, strict=False))
            out[variant]["vs_peer_wall"] = spread([job_s(p, "wall") / job_s(m, "wall") for p, m in pairs])
            out[variant]["vs_peer_cpu"] = spread([job_s(p, "cpu") / job_s(m, "cpu") for p, m in pairs])
            # The measured jobs are a few steps long, so mcpl's one-off setup (VAE posteriors of the image and its
            # flip, cached for every step; the peer encodes every step instead) weighs more than in a real job:
            # the same measured setup and per-step times, at a real job's length.
            out[variant][f"vs_peer_wall_at_{REAL_STEPS}_steps"] = spread([
                _at_steps(p, steps) / _at_steps(m, steps) for p, m in pairs])
    return out


REAL_STEPS = 500  # the paper's and diffusers' textual-inversion runs are thousands of steps; our toy default is 200


def _at_steps(x: dict, measured_steps: int, steps: int = REAL_STEPS) -> float:
    """Seconds of one job of `steps` steps from a round's measured setup and per-step wall time."""
    return x["setup_wall_s"] + x["train_wall_s"] / measured_steps * steps


# ------------------------------------------------------------------------------- targets
def targets(report: dict) -> dict:
    met, missed, figures = [], [], {}
    sections = report.get("sections", {})

    def check(name: str, value: float | None, target: float) -> None:
        if value is None:
            return
        figures[name] = {"value": value, "target": target}
        (met if value >= target else missed).append(name)

    packing = sections.get("packing", {}).get("per_k", {})
    if "4" in packing:
        check("packed_cpu_k4_speedup>=1.5", packing["4"]["speedup_wall"]["median"], TARGETS["packed_cpu_k4"])
    fanout = sections.get("fanout", {}).get("summary")
    if fanout:
        check("fanout_efficiency_with_startup>=0.9", fanout["efficiency_with_startup"]["median"], TARGETS["fanout"])
        check("fanout_efficiency_steady>=0.9", fanout["efficiency_steady"]["median"], TARGETS["fanout"])
    for label, peer in sections.get("peer", {}).items():
        for variant, row in peer.get("summary", {}).items():
            if variant != "peer":
                check(f"peer_{label}_{variant}>=1.5", row["vs_peer_wall"]["median"], TARGETS["peer"])
                if f"vs_peer_wall_at_{REAL_STEPS}_steps" in row:
                    check(f"peer_{label}_{variant}_at_{REAL_STEPS}_steps>=1.5",
                          row[f"vs_peer_wall_at_{REAL_STEPS}_steps"]["median"], TARGETS["peer"])
    return {"met": met, "missed": missed, "figures": figures}


# ------------------------------------------------------------------------------- the CPU run
def cpu_run(args) -> dict:
    from architectures import sd15

    from mcpl.method.model_files import TOY_MODEL
    from mcpl.method.models import load_components

    torch.set_num_threads(1)
    out = Path(args.out)
    report = {"what": "benchmarks/throughput.py", "args": vars(args), "machine": machine(), "targets_set": TARGETS,
              "sections": {}}
    partial = Partial(out, report)
    scratch = Path(tempfile.mkdtemp(prefix="mcpl-throughput-"))
    sections = args.sections.split(",")
    try:
        toy = None
        if "packing" in sections or ("peer" in sections and "toy" in args.peer_models):
            toy = load_components(str(TOY_MODEL), "cpu")
        if "packing" in sections:
            report["sections"]["packing"] = {}

            def keep(part: dict) -> None:
                report["sections"]["packing"] = part
                partial.write()

            keep(packing_section(toy, [int(k) for k in args.ks.split(",")], args.steps, args.rounds, scratch, keep))
        if "fanout" in sections:
            def keep(part: dict) -> None:
                report["sections"]["fanout"] = part
                partial.write()

            keep(fanout_section(str(TOY_MODEL), args.fanout_jobs, args.steps, args.fanout_rounds, args.burn, scratch,
                                keep))
        if "peer" in sections:
            report["sections"]["peer"] = {}
            for label in args.peer_models.split(","):
                def keep(part: dict, label: str = label) -> None:
                    report["sections"]["peer"][label] = part
                    partial.write()

                if label == "toy":
                    image, text = toy_jobs(1)[0]
                    keep(peer_section(toy, "toy", image, text, args.steps, 4, args.rounds, scratch, keep,
                                      packed=4))
                elif label == "sd15":
                    say("building SD 1.5's architecture (random weights)")
                    with timed() as built:
                        components = with_clip_vocab(sd15("cpu", torch.float32, args.sd15_resolution))
                    say(f"built in {built.wall:.0f} s")
                    keep(peer_section(components, "sd15", two_squares(args.sd15_resolution), SD15_SENTENCE,
                                      args.sd15_steps, args.sd15_batch, args.sd15_rounds, scratch, keep,
                                      placeholder="<c1>"))
                    del components
                else:
                    raise SystemExit(f"unknown peer model {label!r} (toy, sd15)")
        report["targets"] = targets(report)
        report["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        partial.write(done=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report


# ------------------------------------------------------------------------------- GPU suite
class Budget:
    """Seconds left for the suite; a part starts only if its estimate fits."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.time() + seconds

    @property
    def left(self) -> float:
        return self.deadline - time.time()

    def allows(self, estimate: float) -> bool:
        return self.left >= estimate


class PartTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Stop the block (at its next Python bytecode) after `seconds` (SIGALRM; main thread only)."""
    import signal

    def stop(*_):
        raise PartTimeout

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def tiny_sdxl(device: str, dtype: torch.dtype, resolution: int = 16):
    from mcpl.method.models import load_components
    from mcpl.method.tiny import build_tiny_sdxl

    return load_components(str(build_tiny_sdxl(Path(tempfile.mkdtemp(prefix="tinyxl-")) / "xl")), device, dtype)


def frozen(name: str, dtype: torch.dtype) -> torch.dtype:
    """The tiny test models stay fp32 (they are for checks, not speed)."""
    return torch.float32 if name.startswith("tiny") else dtype


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_on(device: torch.device, builder: Callable, *args):
    """An architecture built with its weights created on the device (fast random init on a GPU);
    the scheduler is rebuilt on the CPU, as loading a model does."""
    from architectures import _scheduler

    if device.type != "cuda":
        return builder(*args)
    with torch.device(device):
        components = builder(*args)
    return dataclasses.replace(components, scheduler=_scheduler())


def gpu_equality(device: torch.device, steps: int) -> dict:
    """The tiny model trained on the CPU and on the device (fp32, no TF32): the same learned rows."""
    from mcpl.method.models import load_components
    from mcpl.method.tiny import build_tiny_model
    from mcpl.method.trainer import MCPLTrainer

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = str(build_tiny_model(Path(tempfile.mkdtemp(prefix="tiny-")) / "tiny"))
    config = TrainConfig.full_mcpl(steps=steps, batch_size=2, seed=0)
    learned, losses = {}, {}
    for where in ("cpu", str(device)):
        c = load_components(model, where, torch.float32)
        trainer = MCPLTrainer(c, [JobInput.from_text(two_squares(64), SD15_SENTENCE)], config, progress=False)
        learned[where] = trainer.train()
        losses[where] = [h["loss"] for h in trainer.history]
        trainer.close()
    a, b = learned["cpu"], learned[str(device)]
    diff = max(float((a[t] - b[t]).abs().max()) for t in a)
    scale = max(float(a[t].abs().max()) for t in a)
    loss_diff = max(abs(x - y) for x, y in zip(losses["cpu"], losses[str(device)], strict=True))
    return {"steps": steps, "variant": "full MCPL, batch 2, fp32 (TF32 off)", "max_abs_diff_rows": diff,
            "rows_scale": scale, "max_abs_diff_loss": loss_diff, "tolerance": 1e-4,
            "equal": diff <= 1e-4 * max(1.0, scale) and loss_diff <= 1e-4}


def gpu_overhead(device: torch.device, name: str, resolution: int, dtype: torch.dtype, steps: int, warmup: int,
                 batch: int, checkpointing: bool) -> dict:
    """step_overhead's bare / MCPL-one / full ms per step (and peak memory) on one architecture."""
    from architectures import BUILDERS
    from step_overhead import Fresh, measure

    builders = {**BUILDERS, "tiny_sdxl": tiny_sdxl}
    with timed() as built:
        components = build_on(device, builders[name], str(device), frozen(name, dtype), resolution)
    row = measure(Fresh(components), batch, steps, warmup, resolution, checkpointing)
    row["build_s"] = round(built.wall, 1)
    del components
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def gpu_packed(device: torch.device, name: str, resolution: int, dtype: torch.dtype, ks: Sequence[int],
               steps: int, warmup: int, compile_unet: bool, budget: Budget) -> dict:
    """K full-MCPL jobs (batch 4 each) in one pack: ms per pack step after warm-up, per K."""
    from architectures import BUILDERS

    from mcpl.method.packing import PackedJob, PackedTrainer

    components = build_on(device, BUILDERS[name], str(device), frozen(name, dtype), resolution)
    if compile_unet:
        components.unet.compile(dynamic=True)  # one compilation for every pack size
    side = resolution
    sentences = [SD15_SENTENCE, "a photo of a <k1|thing> next to a <k2|object>", "a green <g1|object|green>",
                 "a photo of a blue <d1|dog|blue> on a <d2|board>"]
    out: dict = {"model": name, "resolution": resolution, "dtype": str(dtype).removeprefix("torch."),
                 "variant": "full MCPL, batch 4 per job", "torch_compile": compile_unet, "warmup_steps": warmup,
                 "measured_steps": steps, "per_k": {}}
    for k in ks:
        if not budget.allows(20 if not compile_unet else 60):
            out["per_k"][str(k)] = {"skipped": f"out of time ({budget.left:.0f} s left)"}
            continue
        jobs = [PackedJob([JobInput.from_text(two_squares(side), sentences[j % len(sentences)])],
                          TrainConfig.full_mcpl(steps=100_000, batch_size=4, seed=j, resolution=resolution))
                for j in range(k)]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            pack = PackedTrainer(components, jobs)
            for t in pack.trainers:
                t.begin()
            active = list(range(k))
            times, first = [], None
            for i in range(warmup + steps):
                sync(device)
                start = time.perf_counter()
                logs = pack._step(active)  # one pack step (prepare, one UNet call, losses, optimisers)
                sync(device)
                elapsed = time.perf_counter() - start
                first = elapsed if first is None else first
                for j, job_logs in logs.items():
                    pack.trainers[j].record(job_logs, elapsed / k)
                if i >= warmup:
                    times.append(elapsed * 1000)
            pack.close()
        except torch.OutOfMemoryError as err:
            out["per_k"][str(k)] = {"error": f"out of memory: {err}"[:300]}
            torch.cuda.empty_cache()
            continue
        med = statistics.median(times)
        out["per_k"][str(k)] = {"ms_per_pack_step": spread(times, 1), "first_step_s": round(first, 2),
                                "jobs_per_hour_at_500_steps": round(k * 3600 / (500 * med / 1000), 1),
                                "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                                if device.type == "cuda" else None}
        del pack
    base = out["per_k"].get("1", {}).get("ms_per_pack_step", {}).get("median")
    for k, row in out["per_k"].items():
        if base and "ms_per_pack_step" in row:
            row["speedup_vs_k1"] = round(int(k) * base / row["ms_per_pack_step"]["median"], 3)
    del components
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def gpu_suite(args) -> dict:
    device = torch.device(args.device)
    quick = args.quick
    budget = Budget(args.budget)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report: dict = {"what": "benchmarks/throughput.py --suite gpu", "device": torch.cuda.get_device_name(device)
                    if device.type == "cuda" else platform.processor() or platform.machine(),
                    "machine": machine(), "quick": quick, "budget_s": args.budget, "parts": {}}
    partial = Partial(Path(args.out), report)
    sd15 = ("tiny", 16) if quick else ("sd15", 512)
    sdxl = ("tiny_sdxl", 16) if quick else ("sdxl", 1024)
    few, warm = (2, 1) if quick else (5, 2)
    ks = (1, 2) if quick else (1, 4, 8)
    # (name, estimate: start only if this much is left, limit: the part is stopped after this long)
    parts: list[tuple[str, float, float, Callable[[], dict]]] = [
        ("equality_tiny", 20, 60, lambda: gpu_equality(device, 3 if quick else 8)),
        (f"overhead_{sd15[0]}@{sd15[1]}", 30, 90, lambda: gpu_overhead(device, *sd15, dtype, few, warm,
                                                                        1 if quick else 4, False)),
        ("packed_eager", 30, 90, lambda: gpu_packed(device, *sd15, dtype, ks, few, warm, False, budget)),
        (f"overhead_{sdxl[0]}@{sdxl[1]}", 30, 90, lambda: gpu_overhead(device, *sdxl, dtype, few, warm, 1, False)),
        (f"overhead_{sdxl[0]}@{sdxl[1]}+gc", 30, 90, lambda: gpu_overhead(device, *sdxl, dtype, few, warm, 1, True)),
        ("packed_compiled", 60, 60 if quick else 240,
         lambda: gpu_packed(device, *sd15, dtype, ks, few, warm + 1, True, budget)),
    ]
    for name, estimate, limit, part in parts:
        if not budget.allows(estimate):
            report["parts"][name] = {"skipped": f"out of time: {budget.left:.0f} s left, needs ~{estimate} s"}
            partial.write()
            continue
        limit = min(limit, budget.left)
        say(f"gpu suite: {name} ({budget.left:.0f} s left, at most {limit:.0f} s)")
        report["parts"][name] = {"running": True, "limit_s": round(limit)}  # what a hard kill leaves behind
        partial.write()
        with timed() as t:
            try:
                with time_limit(limit):
                    report["parts"][name] = part()
            except PartTimeout:
                report["parts"][name] = {"stopped": f"still running after its limit of {limit:.0f} s"}
            except Exception as err:  # one part failing must not lose the others' figures
                report["parts"][name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        report["parts"][name]["seconds"] = round(t.wall, 1)
        partial.write()
    packed = report["parts"].get("packed_eager", {}).get("per_k", {})
    if "4" in packed and "speedup_vs_k1" in packed["4"]:
        value = packed["4"]["speedup_vs_k1"]
        report["targets"] = {"packed_gpu_k4>=2": {"value": value, "met": value >= TARGETS["packed_gpu_k4"]}}
    partial.write(done=True)
    return report


# ------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke sizes (< 2 min); writes to a temp folder")
    parser.add_argument("--suite", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--sections", default="packing,fanout,peer")
    parser.add_argument("--ks", default="1,2,4,8", help="pack sizes of the packing section")
    parser.add_argument("--steps", type=int, default=20, help="steps per toy job (packing, fan-out, toy peer row)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the packing section and the toy peer row")
    parser.add_argument("--fanout-jobs", type=int, default=8)
    parser.add_argument("--fanout-rounds", type=int, default=2)
    parser.add_argument("--burn", type=int, default=400, help="iterations of the machine-ceiling loop")
    parser.add_argument("--peer-models", default="toy,sd15")
    parser.add_argument("--sd15-resolution", type=int, default=256)
    parser.add_argument("--sd15-steps", type=int, default=3)
    parser.add_argument("--sd15-batch", type=int, default=1)
    parser.add_argument("--sd15-rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="GPU suite: cuda or cpu")
    parser.add_argument("--budget", type=float, default=330, help="GPU suite: seconds for all its parts")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.ks, args.steps, args.rounds = "1,2", 3, 1
        args.fanout_jobs, args.fanout_rounds, args.burn = 2, 1, 50
        args.peer_models, args.sd15_rounds = "toy", 1
    if args.out is None:
        name = "gpu.json" if args.suite == "gpu" else "throughput.json"
        args.out = str(Path(tempfile.mkdtemp(prefix="throughput-")) / name if args.quick else RESULTS / name)
    report = gpu_suite(args) if args.suite == "gpu" else cpu_run(args)
    say(f"wrote {args.out}")
    if report.get("targets"):
        print(json.dumps(report["targets"], indent=1))
    return report


if __name__ == "__main__":
    main()
