"""Where a measurement came from: device, commit, versions and the command line, recorded beside every benchmark
and experiment result (``bench/report.py`` and the bench scripts, ``flux-engine experiment``)."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
from typing import Dict, Optional, Sequence

# Environment variables that change what a measurement measures; recorded in the command line.
RELEVANT_ENV = (
    "OMP_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "FLUX_ENGINE_BACKEND",
    "TRITON_INTERPRET",
    "FLUX_ENGINE_ATOMIC_SCATTER",
    "FLUX_ENGINE_MOE_RECOMPUTE",
    "FLUX_ENGINE_AUTOTUNE",
)


def versions() -> Dict[str, str]:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "not installed"
    return out


def device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def commit(cwd: Optional[str] = None) -> str:
    """Short hash of HEAD, noting uncommitted changes to tracked files other than results (``bench/results/``: what
    runs write, not what they run); "unknown" outside a git checkout."""
    try:
        run = dict(capture_output=True, text=True, check=True, cwd=cwd)
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                ":(top,exclude)bench/results"], **run).stdout  # fmt: skip
        return sha + (" (with uncommitted changes)" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line(argv: Sequence[str]) -> str:
    """``argv`` as a shell line, prefixed with the relevant environment variables that are set."""
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in RELEVANT_ENV if k in os.environ]
    return " ".join(env + [shlex.quote(a) for a in argv])
