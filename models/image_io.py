"""Image pre- and post-processing as the upstream pipeline does it (UPSTREAM.md 1.8).

Input images go through `fetch` (RGB, then a Qwen-VL style resize to multiples of 28 within
[3136, 802816] pixels), then either the understanding transform (square resize to 1024, not aspect
preserving) or the editing transform (short side to 512, centre crop). Both end in [-1, 1].
Output images are truncated, not rounded, to uint8, as torchvision's ToPILImage does.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

FACTOR, MIN_PIXELS, MAX_PIXELS, MAX_RATIO = 28, 4 * 28 * 28, 1024 * 28 * 28, 200


class ImageInputError(ValueError):
    """An input image cannot be read or used."""


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """Nearest size with both sides multiples of `factor` and the pixel count within bounds."""
    if min(height, width) <= 0:
        raise ImageInputError(f"image has an empty side ({width}x{height})")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ImageInputError(f"aspect ratio {max(height, width) / min(height, width):.1f} exceeds {MAX_RATIO}")
    h = max(factor, round(height / factor) * factor)  # Python round: ties to even, as upstream
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def open_image(source) -> Image.Image:
    """A path, bytes-like file object or PIL image -> PIL image; unreadable input raises ImageInputError."""
    if isinstance(source, Image.Image):
        return source
    try:
        img = Image.open(source)
        img.load()
        return img
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        name = source if isinstance(source, (str, Path)) else type(source).__name__
        raise ImageInputError(f"cannot read image {name}: {exc}") from exc


def fetch(source) -> Image.Image:
    img = open_image(source).convert("RGB")
    h, w = smart_resize(img.height, img.width)
    return img.resize((w, h), Image.BICUBIC)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3) in [0, 1]
    return (torch.from_numpy(arr).permute(2, 0, 1) - 0.5) / 0.5  # (3, H, W) in [-1, 1]


def understanding_tensor(source, size: int = 1024) -> torch.Tensor:
    """(1, 3, size, size) in [-1, 1]: square bicubic resize after `fetch`."""
    return _to_tensor(fetch(source).resize((size, size), Image.BICUBIC))[None]


def edit_tensor(source, size: int = 512) -> torch.Tensor:
    """(1, 3, size, size) in [-1, 1]: short side to `size`, centre crop, after `fetch`."""
    img = fetch(source)
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    img = img.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return _to_tensor(img.crop((left, top, left + size, top + size)))[None]


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) or (1, 3, H, W) in [-1, 1] -> PIL RGB, truncating like ToPILImage."""
    if image.dim() == 4:
        image = image[0]
    x = (image.detach().float().cpu() * 0.5 + 0.5).clamp(0, 1)
    arr = (x * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr, mode="RGB")
