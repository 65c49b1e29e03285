"""The house's rules that a reviewer would otherwise check by eye."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from mcpl.provenance import REPO_ROOT

BUNDLE_NAMES = ("job.json", "spec.json", "outcome.json", "summary.json", "concept.json", "error.log", "job.log",
                "embeddings.safetensors", "checkpoints")


def sources() -> list[Path]:
    return sorted(p for d in ("mcpl", "flows") for p in (REPO_ROOT / d).rglob("*.py"))


def test_bundle_file_names_are_spelled_in_one_module_only():
    quoted = re.compile("|".join(rf"[\"']{re.escape(n)}[\"']" for n in BUNDLE_NAMES))
    owners = {str(p.relative_to(REPO_ROOT)) for p in sources() if quoted.search(p.read_text())}
    assert owners == {"mcpl/job/bundle.py"}


def test_layer_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint), "--no-cache", "--config", str(REPO_ROOT / ".importlinter")], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "0 broken" in done.stdout


def test_mcpl_never_imports_prefect():
    offenders = [str(p) for p in (REPO_ROOT / "mcpl").rglob("*.py")
                 if re.search(r"^\s*(from|import) prefect\b", p.read_text(), re.M)]
    assert offenders == []


def test_cli_help_loads_no_torch():
    """`mcpl --help` answers fast: no torch, diffusers or MLflow behind the parser."""
    code = ("import sys; from mcpl.cli import build_parser; build_parser(); "
            "print(','.join(m for m in ('torch', 'diffusers', 'mlflow', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
