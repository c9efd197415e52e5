"""TensorBoard's event files with the native CRC32C: the checksums TensorBoard's own Python code
computes, and files that TensorBoard reads back, verifying every record's checksums."""

import os

import google_crc32c
import pytest
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
from tensorboard.summary.writer import record_writer
from torch.utils.tensorboard import SummaryWriter

from vaelab import event_files


@pytest.mark.parametrize("size", [0, 1, 7, 8, 1000, 100_003])
def test_masked_crc32c_is_tensorboards(size):
    data = os.urandom(size)
    assert event_files.masked_crc32c(data) == pywrap_tensorflow.masked_crc32c(data)


@pytest.mark.skipif(google_crc32c.implementation != "c", reason="google-crc32c has no C extension here: nothing to use")
def test_a_writer_with_the_native_checksum_writes_files_tensorboard_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(record_writer, "masked_crc32c", record_writer.masked_crc32c)  # undone after the test
    event_files.use_native_crc32c()
    assert record_writer.masked_crc32c is event_files.masked_crc32c
    with SummaryWriter(str(tmp_path)) as writer:
        for step in range(3):
            writer.add_scalar("loss", 1.0 / (step + 1), step)
        writer.add_text("note", "x" * 50_000, 3)  # a record of 50 kB, as a picture's
    (events,) = tmp_path.glob("events.out.tfevents.*")
    # TensorBoard's reader checks each record's checksums with its own (Python) CRC32C, and stops at a bad one
    records = list(RawEventFileLoader(str(events)).Load())
    assert len(records) == 5  # the file version record, three scalars, the text
