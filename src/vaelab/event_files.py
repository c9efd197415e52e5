"""TensorBoard event files checksummed by a native CRC32C.

TensorBoard's record writer, which ``torch.utils.tensorboard`` and Lightning's ``TensorBoardLogger``
use, checksums every record with a CRC32C written in Python: 0.26 ms per kB, 130 ms for one
500 kB picture, on the writer's thread, where it holds the GIL against the training loop. The
pictures of one epoch (about 400 kB of PNG) cost 0.1 s so. tensorboardX fixed the same with a
native CRC32C (lanpa/tensorboardX#428); TensorBoard's own writer still has only the Python one.
:func:`use_native_crc32c` gives it google-crc32c's C implementation: the same checksums
(``tests/test_event_files.py``), 0.1 ms for 500 kB. The picture callbacks call it when they are set up
(:meth:`vaelab.callbacks.pictures.Pictures.setup`), in whichever process draws them; the
scalars' records are a few hundred bytes.
"""

import google_crc32c
from tensorboard.summary.writer import record_writer

MASK_DELTA = 0xA282EAD8  # TFRecord's masking: rotate right by 15 bits, add this (modulo 2**32)


def masked_crc32c(data: bytes) -> int:
    """The masked CRC32C of ``data`` that TFRecord (and so every TensorBoard event file) stores."""
    crc = google_crc32c.value(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + MASK_DELTA) & 0xFFFFFFFF


def use_native_crc32c() -> None:
    """Make TensorBoard's record writer use :func:`masked_crc32c` (a no-op where google-crc32c
    has no compiled extension for this platform and would itself fall back to Python)."""
    if google_crc32c.implementation == "c":
        record_writer.masked_crc32c = masked_crc32c
