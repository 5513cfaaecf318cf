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
# Compiles dominate the suite: a persistent cache lets subprocess tests and the slow run reuse them.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(__file__).resolve().parents[1] / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir():
    """`tests/fixtures`: real MiniMax artifacts (small public files; provenance in its README)."""
    return FIXTURES
