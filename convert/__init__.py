"""HF ⇄ m1jax weight conversion: safetensors I/O, the name mapping of both HF layouts, checkpoint validation.

The streaming `m1jax convert` / `m1jax export` commands build on these modules.
"""
