"""Lightning attention (MiniMax-M1's decayed linear attention): public API, Pallas kernels, pure-JAX references."""

from m1jax.pallas_kernels.lightning.api import lightning_attention, lightning_decode, resolve_impl
from m1jax.pallas_kernels.lightning.reference import (
    lightning_attention_blocked,
    lightning_attention_naive,
    lightning_attention_recurrent,
    lightning_decode_reference,
)

__all__ = [
    "lightning_attention",
    "lightning_decode",
    "resolve_impl",
    "lightning_attention_blocked",
    "lightning_attention_naive",
    "lightning_attention_recurrent",
    "lightning_decode_reference",
]
