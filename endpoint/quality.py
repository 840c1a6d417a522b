"""Picture quality against the source: PSNR and SSIM of what a device decoded, sampled.

The synthetic test picture (endpoint/sources.py ``SyntheticPicture``) is a function of its size,
the frame counter and the send time, and its stamp carries both and says the picture is
synthetic (endpoint/stamp.py). So the receiver draws the frame the sender drew, and compares
the luma planes: PSNR (10 log10(255^2 / MSE), 100 dB for a perfect copy) and SSIM.

SSIM is x264's and FFmpeg's (``vf_ssim``), so that its figures compare with ``ffmpeg -lavfi
ssim``: 8x8 windows on a 4-pixel grid, the mean over the windows, luma only (as both tools
report it first), and their constants: Wang et al.'s (2004) scaled to sums over 64 pixels (the
luminance one 64 times smaller than Wang's, x264's choice, which shows only on flat areas). It is
written here, in numpy, rather than taken from a library: scikit-image would bring scipy into
every device for one function, and OpenCV (which has none in its main module) is optional on
devices. Checked against the closed form on flat pictures (tests/test_quality.py).

One frame in ``every`` (30: once a second at 30 fps) is compared; at 640x480 a sample costs
about 3.6 ms (drawing the reference 0.05, PSNR 0.3, SSIM 3.3; measured on a 2-core machine
like CI's): about 0.4 % of a core per stream received.
"""

from __future__ import annotations

import math

import numpy as np

from endpoint.sources import SyntheticPicture
from endpoint.stamp import Stamp

QUALITY_EVERY = 30  #: synthetic frames per sample
PSNR_PERFECT = 100.0  #: dB, for a frame identical to its source (MSE 0)

_C1 = 0.01 * 0.01 * 255 * 255 * 64  # x264's ssim_c1, for sums over 64 pixels
_C2 = 0.03 * 0.03 * 255 * 255 * 64 * 63


def psnr(reference: np.ndarray, decoded: np.ndarray) -> float:
    """PSNR in dB of two uint8 planes of one shape (PSNR_PERFECT when they are equal)."""
    diff = reference.astype(np.int32) - decoded.astype(np.int32)
    mse = float(np.mean(diff * diff))
    return PSNR_PERFECT if mse == 0 else min(PSNR_PERFECT, 10 * math.log10(255 * 255 / mse))


def ssim(reference: np.ndarray, decoded: np.ndarray) -> float:
    """SSIM of two uint8 planes of one shape, x264's way (8x8 windows on a 4-pixel grid); the
    planes are cropped to a multiple of 4 and must be at least 8x8."""
    height, width = (reference.shape[0] // 4) * 4, (reference.shape[1] // 4) * 4
    if height < 8 or width < 8:
        raise ValueError("planes must be at least 8x8 for SSIM")
    # whole numbers until the windows' sums (at most 64 x 2 x 255^2: int32 holds them)
    x = reference[:height, :width].astype(np.int32)
    y = decoded[:height, :width].astype(np.int32)

    def sums(plane: np.ndarray) -> np.ndarray:  # over 4x4 blocks, then 8x8 windows
        rows = plane.reshape(height // 4, 4, width).sum(axis=1)
        blocks = rows.reshape(height // 4, width // 4, 4).sum(axis=2).astype(np.float64)
        return blocks[:-1, :-1] + blocks[1:, :-1] + blocks[:-1, 1:] + blocks[1:, 1:]

    s1, s2, ss, s12 = sums(x), sums(y), sums(x * x + y * y), sums(x * y)
    variances = ss * 64 - s1 * s1 - s2 * s2
    covariance = s12 * 64 - s1 * s2
    windows = ((2 * s1 * s2 + _C1) * (2 * covariance + _C2)
               / ((s1 * s1 + s2 * s2 + _C1) * (variances + _C2)))
    return float(windows.mean())


class QualityMeter:
    """PSNR and SSIM of one in ``every`` synthetic frames a device decodes, against the frame
    drawn again from its stamp; the mean and the least of each."""

    def __init__(self, every: int = QUALITY_EVERY) -> None:
        if every < 1:
            raise ValueError("every must be at least 1")
        self.every = every
        self.samples = 0
        self._seen = 0
        self._picture: SyntheticPicture | None = None
        self._psnr_sum = self._ssim_sum = 0.0
        self.psnr_min: float | None = None
        self.ssim_min: float | None = None

    def frame(self, luma: np.ndarray, found: Stamp | None) -> bool:
        """Take a decoded frame's luma plane (rows x width) and its stamp: True if it was
        sampled. Frames without a stamp of the synthetic picture are not counted."""
        if found is None or not found.synthetic:
            return False
        self._seen += 1
        if (self._seen - 1) % self.every:
            return False
        height, width = luma.shape[:2]
        picture = self._picture
        if picture is None or (picture.width, picture.height) != (width, height):
            try:
                picture = self._picture = SyntheticPicture(width, height)
            except ValueError:  # no synthetic picture is this shape (odd): not one of ours
                return False
        reference = picture.draw(found.counter, found.sent_ms)[:height]
        self._add(psnr(reference, luma), ssim(reference, luma))
        return True

    def _add(self, psnr_db: float, ssim_value: float) -> None:
        self.samples += 1
        self._psnr_sum += psnr_db
        self._ssim_sum += ssim_value
        self.psnr_min = psnr_db if self.psnr_min is None else min(self.psnr_min, psnr_db)
        self.ssim_min = ssim_value if self.ssim_min is None else min(self.ssim_min, ssim_value)

    @property
    def psnr_db(self) -> float | None:
        """The mean PSNR of the samples, dB (None: none yet)."""
        return self._psnr_sum / self.samples if self.samples else None

    @property
    def ssim(self) -> float | None:
        return self._ssim_sum / self.samples if self.samples else None
