"""`mcpl batch` as a user runs it, end to end: one job at a time vs packed vs 2 workers, side by side.

The example dataset (`mcpl data example`: 4 two-object scenes + one MCPL-diverse pair = 5 jobs)
is validated once; then each variant is a fresh `mcpl batch` process into its own empty folder
(interpreter start, imports, model load, training, samples, bundles: everything a user waits for),
variants alternating order round by round so a busy machine slows all of them alike.

  one_at_a_time  --pack 1 --workers 1   what `mcpl batch` and `dvc repro` did before this round
  packed         --workers 1            the default: compatible jobs share one UNet call per step
  workers2       --workers 2            two single-thread worker processes (default packing)

    python benchmarks/batch_cli.py                       # 2 rounds, 100 steps per job (~12 min on 2 cores)
    python benchmarks/batch_cli.py --rounds 1 --steps 10 --out /tmp/b.json   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = {
    "one_at_a_time": ["--pack", "1", "--workers", "1"],
    "packed": ["--workers", "1"],
    "workers2": ["--workers", "2"],
}


def mcpl(*args: str, env: dict) -> subprocess.CompletedProcess:
    """One CLI call; exit 1 (a job failed) or 2 raises with the command's output."""
    done = subprocess.run([sys.executable, "-m", "mcpl", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        tail = done.stdout[-2000:] + done.stderr[-3000:]
        raise RuntimeError(f"mcpl {' '.join(args)} exited {done.returncode}:\n{tail}")
    return done


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=100, help="steps per job (params.yaml's train section otherwise)")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "batch_cli.json"))
    args = ap.parse_args(argv)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    scratch = Path(tempfile.mkdtemp(prefix="mcpl-batch-cli-"))
    try:
        mcpl("data", "example", str(scratch / "data"), env=env)
        mcpl("data", "validate", str(scratch / "data"), "--manifest", str(scratch / "manifest.parquet"), env=env)
        seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
        names = list(VARIANTS)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                out = scratch / f"{name}-{r}"
                started = time.perf_counter()
                mcpl("batch", "--manifest", str(scratch / "manifest.parquet"), "--out", str(out),
                            "--config", "params.yaml:train", "--set", f"steps={args.steps}",
                            "--samples", str(args.samples), "--sample-steps", "10", "--quiet", *VARIANTS[name],
                            env=env)
                seconds[name].append(round(time.perf_counter() - started, 1))
                jobs = len(json.loads((out / "summary.json").read_text())["jobs"])
                print(f"round {r} {name}: {seconds[name][-1]} s for {jobs} jobs", flush=True)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    base = statistics.median(seconds["one_at_a_time"])
    report = {
        "what": "mcpl batch end to end on the example data (5 jobs), fresh process per run",
        "steps_per_job": args.steps, "samples": args.samples, "rounds": args.rounds,
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "git_rev": git_revision(),
                    "date": time.strftime("%Y-%m-%d %H:%M"), "load_average_end": list(os.getloadavg())},
        "variants": {name: {"args": VARIANTS[name], "seconds": s, "median_s": statistics.median(s),
                            "speedup_vs_one_at_a_time": round(base / statistics.median(s), 3)}
                     for name, s in seconds.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report["variants"], indent=1))
    return report


if __name__ == "__main__":
    main()
