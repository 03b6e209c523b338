"""Training: the one loop (`fit`) and checkpointing."""

from vaelab.training.loop import fit

__all__ = ["fit"]
