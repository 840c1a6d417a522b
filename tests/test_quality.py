"""Picture quality against the source: the stamp that says a picture is synthetic, PSNR, SSIM
(checked against their closed forms), and the sampling meter."""

from __future__ import annotations

import math

import numpy as np
import pytest

from endpoint import stamp
from endpoint.quality import PSNR_PERFECT, QualityMeter, psnr, ssim
from endpoint.sources import SyntheticPicture


def test_the_stamp_says_whether_the_picture_is_the_synthetic_one() -> None:
    for synthetic in (False, True):
        original = stamp.Stamp(77, 0xDEADBEEF, synthetic=synthetic)
        assert stamp.Stamp.from_bytes(original.to_bytes()) == original
    # the two kinds differ in the checksum alone: neither reads as the other
    plain, marked = stamp.Stamp(1, 2).to_bytes(), stamp.Stamp(1, 2, synthetic=True).to_bytes()
    assert plain[:8] == marked[:8] and plain[8:] != marked[8:]
    luma = SyntheticPicture(640, 480).draw(5, 1234)[:480]
    assert stamp.read(luma) == stamp.Stamp(5, 1234, synthetic=True)


def test_psnr_is_100_db_for_a_copy_and_follows_the_mse() -> None:
    rng = np.random.default_rng(1)
    plane = rng.integers(20, 230, (48, 64), dtype=np.uint8)
    assert psnr(plane, plane) == PSNR_PERFECT
    assert psnr(plane, plane + 5) == pytest.approx(10 * math.log10(255**2 / 25))


def test_ssim_is_1_for_a_copy_and_matches_its_closed_form_on_flat_pictures() -> None:
    rng = np.random.default_rng(2)
    plane = rng.integers(0, 256, (64, 96), dtype=np.uint8)
    assert ssim(plane, plane) == pytest.approx(1.0)
    # flat pictures a and b: no variance, so SSIM is the luminance term alone, on x264's sums
    # over 8x8 windows (s = 64 a) with its constant c1 = 0.01^2 x 255^2 x 64
    c1 = 0.01**2 * 255**2 * 64
    for a, b in ((100, 100), (100, 120), (16, 235)):
        x, y = np.full((32, 32), a, np.uint8), np.full((32, 32), b, np.uint8)
        s1, s2 = 64 * a, 64 * b
        assert ssim(x, y) == pytest.approx((2 * s1 * s2 + c1) / (s1 * s1 + s2 * s2 + c1))
    # more noise, less structure kept
    noisy = [np.clip(plane.astype(int) + rng.integers(-k, k + 1, plane.shape), 0, 255)
             .astype(np.uint8) for k in (2, 10, 40)]
    scores = [ssim(plane, n) for n in noisy]
    assert 1.0 > scores[0] > scores[1] > scores[2] > 0.0
    with pytest.raises(ValueError):
        ssim(plane[:4], plane[:4])


def test_the_meter_samples_one_synthetic_frame_in_every_and_rebuilds_it_from_the_stamp() -> None:
    picture = SyntheticPicture(640, 480)
    meter = QualityMeter(every=3)
    for n in range(9):
        luma = picture.draw(n, 1000 + 33 * n)[:480]
        meter.frame(luma, stamp.read(luma))
    assert meter.samples == 3
    assert meter.psnr_db == PSNR_PERFECT and meter.ssim == pytest.approx(1.0)
    # a damaged frame lowers the least and the mean
    luma = picture.draw(9, 1297)[:480].copy()
    luma[200:300, 100:400] = 0
    assert meter.frame(luma, stamp.read(luma))
    assert meter.psnr_min is not None and meter.psnr_min < 30
    assert meter.ssim_min is not None and meter.ssim_min < 0.95
    assert meter.psnr_db is not None and meter.psnr_db < PSNR_PERFECT
    # a camera's stamped picture, or none, is not compared
    camera = np.full((480, 640), 90, np.uint8)
    stamp.draw(camera, stamp.Stamp(10, 5))
    for _ in range(6):
        assert not meter.frame(camera, stamp.read(camera))
        assert not meter.frame(camera, None)
    assert meter.samples == 4
    # a picture no synthetic source makes (odd width) is not compared, nor does it raise
    every = QualityMeter(every=1)
    odd = np.full((480, 641), 90, np.uint8)
    stamp.draw(odd, stamp.Stamp(11, 5, synthetic=True))
    assert not every.frame(odd, stamp.read(odd))
    assert every.samples == 0
