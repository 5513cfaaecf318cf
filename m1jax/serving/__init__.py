"""Serving: the continuous-batching scheduler over one `Engine` (`m1jax.serving.scheduler`)."""

from m1jax.serving.scheduler import Delta, Request, RequestHandle, RequestOutput, Scheduler

__all__ = ["Delta", "Request", "RequestHandle", "RequestOutput", "Scheduler"]
