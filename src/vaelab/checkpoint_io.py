"""Checkpoint files written atomically: a save that fails or is killed leaves every earlier
checkpoint as it was and no partial file under a checkpoint's name.

Lightning's own writer stages the file in the system's temporary folder and moves it over the old
one; across filesystems that move is a copy that first truncates the old file, so a full disk or a
kill during it destroyed the previous ``last.ckpt``. :class:`AtomicCheckpointIO` (the trainer
configs' ``plugins``) writes a temporary file in the checkpoint's own folder, flushes it to disk,
then renames it over the old file: a rename within one filesystem replaces the file whole.
"""

import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.plugins.io import TorchCheckpointIO

PARTIAL = ".checkpoint.partial"  # the file being written, one per folder: a killed save's is reused


class CheckpointSaveError(OSError):
    """A checkpoint could not be written; the message names the cause and the last complete one."""


def last_complete(folder: Path) -> Path | None:
    """``last.ckpt`` if the folder has one, else its newest ``.ckpt``, else None."""
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    return max(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, default=None)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes ``<folder>/.checkpoint.partial``, fsyncs it, renames it to the checkpoint's name and
    fsyncs the folder; on failure removes the partial file and raises :class:`CheckpointSaveError`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.parent / PARTIAL
        data = io.BytesIO()  # serialised first: torch.save into a file hides a failed write's OSError
        torch.save(checkpoint, data)
        try:
            with partial.open("wb") as f:
                f.write(data.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)  # the rename itself reaches the disk
            finally:
                os.close(folder)
        except BaseException as err:  # a full disk, a Ctrl-C
            partial.unlink(missing_ok=True)
            if not isinstance(err, OSError):
                raise
            last = last_complete(path.parent)
            kept = f"the last complete checkpoint is {last}" if last else "no checkpoint was completed"
            raise CheckpointSaveError(f"could not write checkpoint {path} ({err.strerror or err}); {kept}") from err
