"""The stamp: a frame counter and the send time, drawn into a picture as black/white blocks.

80 bits (32-bit counter, send time in ms modulo 2**32, 16-bit checksum) as two rows of 40 blocks
at the top left of the luma plane. Blocks are ``width // 40`` pixels rounded down to a multiple of
8 (16 px at 640x480), aligned to the codec's macroblock grid, full black or full white, so they
survive VP8/H.264 compression; the reader averages the middle of each block and checks the sum,
so a damaged stamp is reported as unreadable rather than misread.

The checksum also says whether the rest of the picture is the synthetic test picture
(endpoint/sources.py ``SyntheticPicture``), which the receiver can then draw again from the
stamp alone and compare with what it decoded (endpoint/quality.py): such a stamp's checksum is
the CRC-32 taken from SYNTHETIC_SEED rather than from 0 (a camera's picture is stamped the
plain way). A damaged stamp matches either with odds of 2**-16, as before.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

COLUMNS = 40
ROWS = 2
BITS = COLUMNS * ROWS
BLACK, WHITE = 16, 235  # video-range luma
MIN_WIDTH = 320
SYNTHETIC_SEED = 0x5E17  #: the CRC's start value in the stamp of a synthetic picture


@dataclass(frozen=True)
class Stamp:
    counter: int  #: frame number at the source, from 0, modulo 2**32
    sent_ms: int  #: UNIX time in ms when the frame left the source, modulo 2**32
    #: the picture is the synthetic one, which the stamp alone lets a receiver draw again
    synthetic: bool = False

    def to_bytes(self) -> bytes:
        body = (self.counter & 0xFFFFFFFF).to_bytes(4, "big") + \
            (self.sent_ms & 0xFFFFFFFF).to_bytes(4, "big")
        seed = SYNTHETIC_SEED if self.synthetic else 0
        return body + (zlib.crc32(body, seed) & 0xFFFF).to_bytes(2, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Stamp | None:
        body, check = data[:8], int.from_bytes(data[8:10], "big")
        if zlib.crc32(body) & 0xFFFF == check:
            synthetic = False
        elif zlib.crc32(body, SYNTHETIC_SEED) & 0xFFFF == check:
            synthetic = True
        else:
            return None
        return cls(int.from_bytes(body[:4], "big"), int.from_bytes(body[4:8], "big"),
                   synthetic)


def block_size(width: int) -> int:
    if width < MIN_WIDTH:
        raise ValueError(f"frames must be at least {MIN_WIDTH} pixels wide to carry a stamp")
    return (width // COLUMNS) // 8 * 8


def stamp_height(width: int) -> int:
    return ROWS * block_size(width)


def draw(luma: np.ndarray, stamp: Stamp) -> None:
    """Write ``stamp`` into the top-left corner of a luma plane (rows x width, uint8)."""
    size = block_size(luma.shape[1])
    bits = np.unpackbits(np.frombuffer(stamp.to_bytes(), dtype=np.uint8)).reshape(ROWS, COLUMNS)
    levels = np.where(bits == 1, WHITE, BLACK).astype(np.uint8)
    luma[: ROWS * size, : COLUMNS * size] = np.repeat(np.repeat(levels, size, 0), size, 1)


def read(luma: np.ndarray) -> Stamp | None:
    """Read a stamp back from a decoded luma plane; None if absent or damaged."""
    height, width = luma.shape[:2]
    if width < MIN_WIDTH:
        return None
    size = block_size(width)
    if height < ROWS * size:
        return None
    area = luma[: ROWS * size, : COLUMNS * size].reshape(ROWS, size, COLUMNS, size)
    lo, hi = size // 4, size - size // 4
    means = area[:, lo:hi, :, lo:hi].mean(axis=(1, 3))
    bits = (means > (BLACK + WHITE) / 2).astype(np.uint8).reshape(-1)
    return Stamp.from_bytes(np.packbits(bits).tobytes())


def unwrap(value: int, near: int, bits: int = 32) -> int:
    """The full number nearest ``near`` whose low ``bits`` bits are ``value`` (a send time in
    ms modulo 2**bits, unwrapped against the receiver's clock)."""
    half = 1 << (bits - 1)
    return near - ((near - value + half) & ((1 << bits) - 1)) + half


def unwrap_ms(sent_ms: int, now_ms: int) -> int:
    """The full UNIX ms time nearest ``now_ms`` whose low 32 bits are ``sent_ms``."""
    return unwrap(sent_ms, now_ms, 32)
