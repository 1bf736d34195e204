"""Images in and out: [-1, 1] tensors to uint8, grids and strips as PNGs (the one owner of that conversion)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0), channels_first: bool | None = None) -> np.ndarray:
    """(N, C, H, W) or (N, H, W, C) floats in `value_range` (or uint8) -> (N, H, W, C) uint8.

    channels_first: None guesses from the shape (C in {1, 3, 4} on axis 1 and not on the last axis).
    A single image (3-d array) is treated as N = 1.
    """
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W) or (N, H, W, C), got {x.shape}")
    if channels_first is None:
        channels_first = x.shape[1] in (1, 3, 4) and x.shape[-1] not in (1, 3, 4)
    if channels_first:
        x = x.transpose(0, 2, 3, 1)
    if x.dtype != np.uint8:
        lo, hi = value_range
        x = (x.astype(np.float64) - lo) / (hi - lo)
        x = (x * 255.0).round().clip(0, 255).astype(np.uint8)
    return x


def to_uint8_tensor(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats (any shape) -> uint8 on the same grid as a saved PNG (round half to even)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2, pad_value: int = 255) -> Image.Image:
    """Tile (N, H, W, C) uint8 images into a grid, `ncols` per row (default: ceil(sqrt(N))).

    Output size: (rows*H + (rows+1)*pad) x (ncols*W + (ncols+1)*pad) pixels.
    """
    x = to_uint8(images)
    n, h, w, c = x.shape
    ncols = max(1, min(n, ncols or math.ceil(math.sqrt(n))))
    rows = math.ceil(n / ncols)
    canvas = np.full((rows * h + (rows + 1) * pad, ncols * w + (ncols + 1) * pad, c), pad_value, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y0 : y0 + h, x0 : x0 + w] = x[i]
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas)


def make_strip(images: np.ndarray, pad: int = 2, pad_value: int = 255) -> Image.Image:
    """One row of (N, H, W, C) uint8 images (an interpolation strip)."""
    return make_grid(images, ncols=len(to_uint8(images)), pad=pad, pad_value=pad_value)


def round_trip_grid(originals: np.ndarray, redrawn: np.ndarray, pad: int = 2) -> Image.Image:
    """Images (top row) over what came back of them (bottom row): a DDIM inversion's round trip. Both as `to_uint8` takes."""
    top, bottom = to_uint8(originals), to_uint8(redrawn)
    return make_grid(np.concatenate([top, bottom]), ncols=len(top), pad=pad).convert("RGB")


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write a PNG, creating parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
