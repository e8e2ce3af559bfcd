"""dtrain: one Hydra config switch between parallelisms, with spot-safe sharded checkpoints."""

__version__ = "0.1.0"
