"""Training: one loop for every mode (`loop.py`), its steps (`steps.py`), checkpoints, schedule,
batch sources (`batches.py`, `data.py`), the end-of-run summary, DDP.

`from fledge.train import train` is the entry point (`prepare_data` runs the corpus stage
first, as `fledge train` does); both are imported lazily so that the submodules (batches,
checkpoints) load without the loop and its imports.
"""

__all__ = ["train", "prepare_data", "TrainResult"]


def __getattr__(name: str):
    if name in __all__:
        from fledge.train import loop
        return getattr(loop, name)
    raise AttributeError(name)
