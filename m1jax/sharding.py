"""Logical axes → mesh axes: the one sharding-rules table of m1jax.

Every parameter declares logical axes (`weights.param`), every large activation is constrained by logical
names (`constrain`). `RULES` maps each logical axis to a mesh axis (or None = replicated). A logical axis is
sharded only if its mesh axis exists in the mesh, has size > 1, divides the dimension, and is not already
used by another dimension of the same array; otherwise that dimension stays replicated. Changing the
parallelism means editing this table (or passing `rules=`), not the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

# Default mesh axes: ("data", "fsdp", "tensor", "expert").
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),  # tokens split over the expert axis too: the MoE exchanges them
    # The data axes that the batch leaves unused (batch 1 at long context) split the sequence (sequence sharding:
    # lightning passes decayed states between shards, softmax attention gathers K/V or combines partial softmaxes).
    "seq": ("data", "fsdp", "expert"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "qkv": None,
    "mlp": "tensor",
    "experts": ("expert", "fsdp"),  # experts over fsdp too: token exchange instead of gathering expert weights
    "router_experts": None,
    "state_k": None,
    "state_v": None,
    "layers": None,  # the group axis of a scanned model's stacked layer parameters
}

MESH_AXES = ("data", "fsdp", "tensor", "expert")


def make_mesh(shape: Mapping[str, int] | Sequence[int], devices=None) -> jax.sharding.Mesh:
    """A mesh with GSPMD-style (Auto) axes, e.g. `make_mesh({"data": 2, "tensor": 4})`.

    Axes not named get size 1. The product of sizes must equal the number of devices used.
    """
    if not isinstance(shape, Mapping):
        shape = dict(zip(MESH_AXES, shape, strict=False))
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; m1jax uses {MESH_AXES}")
    sizes = tuple(int(shape.get(a, 1)) for a in MESH_AXES)
    devices = jax.devices() if devices is None else devices
    n = 1
    for s in sizes:
        n *= s
    if n != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {n} devices, have {len(devices)}")
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(sizes, MESH_AXES, axis_types=auto, devices=devices)
    except NotImplementedError:  # a TPU torus cannot give every shape whole physical axes (e.g. 8 of 4x4x4)
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
        return jax.sharding.Mesh(grid, MESH_AXES, axis_types=auto)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh, rules: Mapping | None = None
                    ) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions carry logical `axes`."""
    rules = RULES if rules is None else rules
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    mesh_sizes = dict(mesh.shape)
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape, strict=True):
        target = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no entry in the sharding rules")
        cand = (target,) if isinstance(target, str) else tuple(target or ())
        chosen = []
        size = 1
        for axis in cand:
            s = mesh_sizes.get(axis, 1)
            if s > 1 and axis not in used and dim % (size * s) == 0:
                chosen.append(axis)
                size *= s
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def named_sharding(axes, shape, mesh, rules=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def spec_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None → (), "a" → ("a",), ("a", "b") → ("a", "b"))."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def axes_size(mesh, axes: Sequence[str]) -> int:
    """Number of shards along the mesh axes `axes` (1 for none)."""
    n = 1
    for a in axes:
        n *= dict(mesh.shape)[a]
    return n


def current_mesh():
    """The active mesh (`jax.set_mesh`), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def constrain(x: jax.Array, axes: Sequence[str | None], rules=None) -> jax.Array:
    """`with_sharding_constraint` by logical axes under the active mesh (`jax.set_mesh`); identity otherwise."""
    mesh = current_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh, rules))
