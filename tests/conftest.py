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

import gc  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs():
    """Drops JAX's compiled programs after each test module.

    XLA:CPU maps a few memory regions per compiled executable and a process keeps every executable its jitted
    functions have compiled: the whole default suite in one process reached Linux's `vm.max_map_count` (65530)
    near test_readme, where the next compile aborted (SIGABRT or SIGSEGV inside `backend_compile_and_load`).
    """
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def fixtures_dir():
    """`tests/fixtures`: real MiniMax artifacts (small public files; provenance in its README)."""
    return FIXTURES
