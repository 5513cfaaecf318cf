"""Serving: the continuous-batching scheduler over one `Engine` (`m1jax.serving.scheduler`), the HTTP server
(`m1jax.serving.server`, `m1jax serve`) and the resumable batch job (`m1jax.serving.batch`, `m1jax batch`)."""

from m1jax.serving.scheduler import Delta, Request, RequestHandle, RequestOutput, Scheduler

__all__ = ["Delta", "Request", "RequestHandle", "RequestOutput", "Scheduler"]
