"""Shared mechanisms for the training scripts at the repository root.

Each module holds one mechanism (config loading, data, checkpointing, EMA, ...);
the scripts read top to bottom and call into these.
"""
