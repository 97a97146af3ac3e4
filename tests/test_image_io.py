"""Image pre/post-processing as upstream does it, and clear errors for unusable images."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from models.image_io import ImageInputError, edit_tensor, smart_resize, to_pil, understanding_tensor


@pytest.mark.parametrize("hw,expected", [
    ((512, 512), (504, 504)),  # UPSTREAM.md's example
    ((1024, 768), (1036, 756)),  # round(36.57)=37, round(27.43)=27
    ((10, 10), (56, 56)),  # below min_pixels: scaled up
    ((4000, 3000), (1008, 756)),  # above max_pixels: floor(36.95)=36, floor(27.7)=27
])
def test_smart_resize(hw, expected):
    h, w = smart_resize(*hw)
    assert (h, w) == expected
    assert h % 28 == 0 and w % 28 == 0 and 3136 <= h * w <= 802816


def test_extreme_aspect_ratio_is_refused():
    with pytest.raises(ImageInputError, match="aspect ratio"):
        smart_resize(10, 3000)


def test_transforms_any_mode_and_size():
    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 500, 4), dtype=np.uint8), "RGBA")
    gray = Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 90), dtype=np.uint8), "L")
    for img in (rgba, gray):
        u = understanding_tensor(img, 256)
        e = edit_tensor(img, 128)
        assert u.shape == (1, 3, 256, 256) and e.shape == (1, 3, 128, 128)
        assert u.min() >= -1 and u.max() <= 1 and e.dtype == torch.float32


def test_unreadable_image():
    with pytest.raises(ImageInputError, match="cannot read image"):
        understanding_tensor(io.BytesIO(b"not an image"))
    with pytest.raises(ImageInputError, match="cannot read image"):
        edit_tensor("/nonexistent/picture.png")


def test_to_pil_truncates():
    x = torch.full((3, 2, 2), 0.999)  # (0.999*0.5+0.5)*255 = 254.87 -> 254, not 255
    assert np.asarray(to_pil(x))[0, 0, 0] == 254
    assert np.asarray(to_pil(-torch.ones(1, 3, 2, 2))).max() == 0
