"""The GaLR model in PyTorch (needs torch; the runtime never imports this package)."""

from galr.model.checkpoint import (
    CheckpointError,
    LoadedCheckpoint,
    load_checkpoint,
    save_checkpoint,
)
from galr.model.galr import GaLR

__all__ = ["GaLR", "CheckpointError", "LoadedCheckpoint", "load_checkpoint", "save_checkpoint"]
