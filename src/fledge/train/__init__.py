"""Training: one loop for every mode (`loop.py`), checkpoints, schedule, batches, DDP.

`from fledge.train import train` is the entry point; it is imported lazily so that the
submodules (batches, checkpoints) load without the loop and its imports.
"""

__all__ = ["train", "TrainResult"]


def __getattr__(name: str):
    if name in __all__:
        from fledge.train import loop
        return getattr(loop, name)
    raise AttributeError(name)
