"""Training: one loop for every mode (`loop.py`), checkpoints, schedule, batches, DDP."""

from fledge.train.loop import TrainResult, train

__all__ = ["train", "TrainResult"]
