"""Pallas kernels of m1jax, each beside its pure-JAX reference.

`lightning_attention` / `lightning_decode` are the entry points the model uses; `impl` picks the Pallas
kernel or the XLA reference path (see `m1jax.pallas_kernels.lightning.api`).
"""

from m1jax.pallas_kernels.lightning import lightning_attention, lightning_decode

__all__ = ["lightning_attention", "lightning_decode"]
