"""Canny edge maps, so a ControlNet user can send a photo instead of an edge map (`preprocess: "canny"`).

The classic steps on the luminance: Gaussian smoothing, Sobel gradients, thinning to the local maxima along the
gradient, and hysteresis between two thresholds (weak edges kept where they touch strong ones). White edges on
black, as the canny ControlNets were trained on.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

LOW, HIGH = 100, 200  # thresholds on the gradient magnitude, as OpenCV's Canny examples and A1111 default to


def canny(image: Image.Image, low: float = LOW, high: float = HIGH, sigma: float = 1.0) -> Image.Image:
    from scipy import ndimage

    gray = np.asarray(image.convert("L"), dtype=np.float64)
    smooth = ndimage.gaussian_filter(gray, sigma)
    gx, gy = ndimage.sobel(smooth, axis=1), ndimage.sobel(smooth, axis=0)
    magnitude = np.hypot(gx, gy)  # on OpenCV's scale (its 3x3 Sobel), so the usual thresholds mean the same
    thin = _local_maxima(magnitude, np.arctan2(gy, gx))
    strong, weak = thin >= high, thin >= low
    labels, count = ndimage.label(weak, structure=np.ones((3, 3)))
    keep = np.zeros(count + 1, dtype=bool)
    keep[np.unique(labels[strong])] = True
    keep[0] = False
    edges = keep[labels]
    return Image.fromarray((edges * 255).astype(np.uint8)).convert("RGB")


def _local_maxima(magnitude: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """The magnitude where it is at least its two neighbours across the edge (the gradient's direction binned
    to 0, 45, 90 or 135 degrees), zero elsewhere."""
    padded = np.pad(magnitude, 1)
    h, w = magnitude.shape
    sector = (np.round(angle / (np.pi / 4)) % 4).astype(int)
    offsets = {0: (0, 1), 1: (1, 1), 2: (1, 0), 3: (1, -1)}  # (dy, dx) along the gradient
    out = np.zeros_like(magnitude)
    for index, (dy, dx) in offsets.items():
        ahead = padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        behind = padded[1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]
        chosen = (sector == index) & (magnitude >= ahead) & (magnitude >= behind)
        out[chosen] = magnitude[chosen]
    return out
