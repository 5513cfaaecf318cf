"""Named accelerator topologies: chip facts (published peaks) and deviceless TPU devices for AOT compilation.

A TPU slice name counts TensorCores on v5p (`v5p-128` = 64 chips, two cores per chip) and chips on v5e/v6e
(`v5e-64` = 64 chips). `topology_devices(name)` returns the slice's devices from libtpu's topology description
without any TPU attached, so `jax.jit(f).lower(*abstract_args).compile()` runs the real TPU compiler here;
the process must have been started with `JAX_PLATFORMS=cpu TPU_ACCELERATOR_TYPE=<any valid type>` (see
`deviceless_env`), before jax is imported. With the jax CUDA plugin installed (`pip install -e '.[gpu-aot]'`),
`gpu_devices("h100", n)` does the same for GPUs from a target description (no GPU or driver needed);
`deviceless_platforms()` says which of the two this environment can compile for.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip peaks: HBM capacity (bytes), dense bf16 FLOP/s, HBM bytes/s, interconnect bytes/s
    (one direction, all links together)."""

    name: str
    hbm_bytes: float
    bf16_flops: float
    hbm_bw: float
    ici_bw: float
    platform: str  # "tpu" | "gpu"


GB = 1e9
CHIPS = {
    "v5p": Chip("TPU v5p", 95 * GB, 459e12, 2765 * GB, 600 * GB, "tpu"),
    "v5e": Chip("TPU v5e", 16 * GB, 197e12, 819 * GB, 200 * GB, "tpu"),
    "v6e": Chip("TPU v6e", 32 * GB, 918e12, 1640 * GB, 448 * GB, "tpu"),
    "h100": Chip("NVIDIA H100 SXM", 80 * GB, 989e12, 3350 * GB, 450 * GB, "gpu"),
    "h200": Chip("NVIDIA H200 SXM", 141 * GB, 989e12, 4800 * GB, 450 * GB, "gpu"),
}

# chips per slice → libtpu topology string (the smallest standard slice shapes)
_TPU_SHAPES = {
    "v5p": {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
            512: "8x8x8"},
    "v5e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
    "v6e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
}
_GPU_HOSTS = {"8xh100": ("h100", 8), "8xh200": ("h200", 8)}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as the user wrote it, e.g. "v5p-128"
    chip: Chip
    num_chips: int
    tpu_topology: str | None  # libtpu's name, e.g. "v5p:4x4x4"; None for GPU hosts


def parse_topology(name: str) -> Topology:
    """`v5p-8 … v5p-1024`, `v5e-1 … v5e-256`, `v6e-1 … v6e-256`, `8xh100`, `8xh200` → `Topology`."""
    key = name.strip().lower()
    if key in _GPU_HOSTS:
        chip, n = _GPU_HOSTS[key]
        return Topology(name, CHIPS[chip], n, None)
    gen, _, count = key.partition("-")
    if gen not in _TPU_SHAPES or not count.isdigit():
        raise ValueError(f"unknown topology {name!r}; expected one of {', '.join(known_topologies())}")
    chips = int(count) // 2 if gen == "v5p" else int(count)
    shape = _TPU_SHAPES[gen].get(chips)
    if shape is None:
        raise ValueError(f"unknown topology {name!r}; expected one of {', '.join(known_topologies())}")
    return Topology(name, CHIPS[gen], chips, f"{gen}:{shape}")


def known_topologies() -> list[str]:
    names = [f"v5p-{2 * n}" for n in _TPU_SHAPES["v5p"]]
    names += [f"{g}-{n}" for g in ("v5e", "v6e") for n in _TPU_SHAPES[g]]
    return names + list(_GPU_HOSTS)


def libtpu_available() -> bool:
    """Whether libtpu (the TPU compiler) is importable in this Python environment."""
    return importlib.util.find_spec("libtpu") is not None


LIBTPU_HINT = ("deviceless TPU compilation needs libtpu in a separate environment, e.g.\n"
               "  python3 -m venv .venv-tpu && .venv-tpu/bin/pip install -e . 'libtpu==0.0.42.1'\n"
               "(the version jax 0.10.2 pins), then run the command with .venv-tpu/bin/python")


def deviceless_env(accelerator_type: str = "v5p-8") -> dict[str, str]:
    """Environment variables for a process that compiles for TPU topologies with no TPU attached."""
    return {"JAX_PLATFORMS": "cpu", "TPU_ACCELERATOR_TYPE": accelerator_type, "TPU_WORKER_HOSTNAMES": "localhost",
            "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def topology_devices(topo: Topology | str):
    """The devices of a TPU slice from libtpu's topology description (no TPU needed; see module doc)."""
    topo = parse_topology(topo) if isinstance(topo, str) else topo
    if topo.tpu_topology is None:
        raise ValueError(f"{topo.name} is a GPU host: there is no deviceless compiler for it here")
    if not libtpu_available():
        raise RuntimeError(LIBTPU_HINT)
    if os.environ.get("JAX_PLATFORMS") != "cpu" or "TPU_ACCELERATOR_TYPE" not in os.environ:
        raise RuntimeError("deviceless TPU compilation needs JAX_PLATFORMS=cpu and TPU_ACCELERATOR_TYPE set "
                           "before jax is imported (m1jax.topology.deviceless_env)")
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(topo.tpu_topology, "tpu").devices)


def cuda_plugin_available() -> bool:
    """Whether the jax CUDA plugin (the XLA:GPU compiler, `jax-cuda12-plugin`) is importable."""
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no `jax_plugins` namespace at all
        return False


CUDA_PLUGIN_HINT = ("deviceless GPU compilation needs the jax CUDA plugin matching jaxlib, e.g.\n"
                    "  pip install -e '.[gpu-aot]'   (jax-cuda12-plugin==0.10.2; no CUDA libraries or GPU needed)")


def deviceless_platforms() -> tuple[str, ...]:
    """The platforms this environment can compile for without a device: "tpu" (libtpu), "cuda" (CUDA plugin)."""
    return tuple(p for p, ok in (("tpu", libtpu_available()), ("cuda", cuda_plugin_available())) if ok)


def gpu_target_config(chip: str = "h100") -> str:
    """XLA's GPU target description (text proto) of a Hopper chip in `CHIPS`: sm_90, 132 SMs, its HBM size and
    bandwidth — what the compiler would otherwise query from an attached device."""
    c = CHIPS[chip]
    if c.platform != "gpu":
        raise ValueError(f"{chip!r} is not a GPU; GPU chips: {[k for k, v in CHIPS.items() if v.platform == 'gpu']}")
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024  threads_per_warp: 32  shared_memory_per_block: 49152
  shared_memory_per_core: 233472  threads_per_core_limit: 2048  core_count: 132  fpus_per_core: 128
  block_dim_limit_x: 2147483647  block_dim_limit_y: 65535  block_dim_limit_z: 65535
  memory_bandwidth: {int(c.hbm_bw)}  l2_cache_size: 52428800  clock_rate_ghz: 1.98
  device_memory_size: {int(c.hbm_bytes)}  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
device_description_str: "{c.name}"
"""


def gpu_devices(chip: str = "h100", count: int = 1):
    """`count` compile-only GPU devices of one host (jax CUDA plugin; no GPU needed): `jax.jit(f).lower(...)
    .compile()` over a mesh of them runs XLA:GPU, Triton included. Run with `JAX_PLATFORMS=cpu`."""
    if not cuda_plugin_available():
        raise RuntimeError(CUDA_PLUGIN_HINT)
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(f"{count}x{chip}", "cuda", target_config=gpu_target_config(chip),
                                             topology=f"1x1x{count}").devices)
