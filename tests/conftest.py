"""Test setup: 8 fake CPU devices for mesh tests (must happen before jax is imported), real MiniMax fixtures.

Where libtpu is importable, the deviceless TPU environment is set too (`tests/test_aot.py` compiles for TPU
topologies; the tests themselves still run on the CPU devices).
"""

import os
import pathlib

from m1jax import topology  # imports no jax

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if topology.libtpu_available():
    for _key, _value in topology.deviceless_env().items():
        os.environ.setdefault(_key, _value)
# No persistent compilation cache by default: with one, a full run on a fresh clone aborted (SIGABRT in
# XLA:CPU `executable.serialize()` while jax wrote a cache entry from the scheduler's background thread, in
# test_readme after test_cispo_trainer's own cache fixture). Set JAX_COMPILATION_CACHE_DIR to opt in.

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir():
    """`tests/fixtures`: real MiniMax artifacts (small public files; provenance in its README)."""
    return FIXTURES
