"""Deviceless TPU runs for tests: a Python script compiled for a TPU topology in a fresh process (libtpu reads its
environment at import, and this test process already runs XLA:CPU with fake devices)."""

import json
import os
import pathlib
import subprocess
import sys

from m1jax.topology import deviceless_env

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_deviceless(script: str, topology: str = "v5p-8", timeout: int = 600) -> dict:
    """Run `script` with `deviceless_env(topology)` and this checkout on the path; returns the JSON object its last
    stdout line prints (the test fails with the script's stderr if it exits non-zero)."""
    env = {**os.environ, **deviceless_env(topology), "PYTHONPATH": str(REPO), "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    env.pop("XLA_FLAGS", None)
    run = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
