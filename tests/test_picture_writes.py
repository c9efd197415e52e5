"""The picture writer encodes each picture once: the PNG file holds the pixels torchvision's
``save_image`` writes, and TensorBoard receives the file's bytes."""

import io

import numpy as np
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import save_image

from vaelab.callbacks.pictures import write_png


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_png_file_has_save_image_pixels_and_tensorboard_gets_its_bytes(tmp_path):
    image = torch.rand(3, 30, 50, generator=torch.Generator().manual_seed(0))
    expected = io.BytesIO()
    save_image(image, expected, format="png")
    writer = SummaryWriter(tmp_path / "tb")
    write_png(image, tmp_path / "pics" / "step_0000007.png", [writer], "pictures/x", 7)
    writer.close()

    png = (tmp_path / "pics" / "step_0000007.png").read_bytes()
    assert pixels(png).shape == (30, 50, 3)
    np.testing.assert_array_equal(pixels(png), pixels(expected.getvalue()))
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload()
    (logged,) = events.Images("pictures/x")
    assert (logged.step, logged.height, logged.width) == (7, 30, 50)
    assert logged.encoded_image_string == png
