"""Toy RL tasks with exact, token-level rewards (for end-to-end checks of the trainer)."""
