"""Flax NNX building blocks of the MiniMax-M1 decoder (one file per concept)."""
