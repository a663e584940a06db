"""Settings every configuration shares, so the hub's workers and the bare processes run the same
model the same way and the comparisons differ only in what they are meant to compare."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny.en"


def compute_type(device: str) -> str:
    """int8 on the CPU (the bundled weights are float16, slow there), float16 on a GPU: what a user would pick."""
    return "float16" if device == "cuda" else "int8"


def thread_env(threads: int) -> dict[str, str]:
    """The environment the hub gives a worker with ``cpu_threads: threads`` (see hub/process.py)."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    return env
