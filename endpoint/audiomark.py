"""Audio timing marks: the synthetic tone says when it was sent, in a form that survives Opus.

Once a second (every ``MARK_EVERY`` 20-ms frames) the tone gives way to a mark of nine 20-ms
symbols, one per audio frame: a sync tone, then eight data tones of 4 bits each (MFSK, 16 tones
from 1000 to 3250 Hz, 150 Hz apart): the send time in ms modulo 2**24 and a CRC-8 of it. Tones
in the voice band pass Opus at 32 kbit/s (its VoIP mode keeps 8 kHz and more), and one tone per
frame keeps each symbol a single peak that Goertzel filters tell apart from the next.

The receiver decides each decoded frame's symbol (the strongest of the 17 tones, if it holds
most of the frame's energy) and reads a mark back as sync, then eight data symbols on
consecutive frames, then the CRC. Its latency is the sync frame's delivery time minus the send
time (one clock, like the video stamp's). Opus delays the decoded signal by 6.5 ms (its
look-ahead), less than half a frame, so a symbol still holds most of the frame it was sent in.
A frame lost, or a symbol misread, loses that mark (the CRC rejects a misread with odds of 1 in
256): marks lost are counted from the gap in send times, one mark a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from endpoint import stamp

RATE = 48_000
FRAME = 960  #: samples in a 20 ms frame
MARK_EVERY = 50  #: frames between marks: one a second
MARK_PERIOD_MS = MARK_EVERY * FRAME * 1000 // RATE
DATA_TONES = tuple(1000.0 + 150.0 * k for k in range(16))
SYNC_TONE = 3600.0
SYNC = 16  #: the sync tone's symbol number (data symbols are 0..15)
DATA_SYMBOLS = 8  #: 24-bit time + CRC-8, 4 bits a symbol
MARK_FRAMES = 1 + DATA_SYMBOLS
TIME_BITS = 24
TIME_MASK = (1 << TIME_BITS) - 1
#: a frame's symbol is its strongest tone if that holds at least this share of the frame's
#: energy (a whole tone: 1; the 13.5 ms of a symbol after Opus's 6.5 ms delay: 0.46) and at
#: least RATIO times the next strongest tone's
MIN_SHARE = 0.2
RATIO = 2.0
#: Opus bitrate below which marks are not sent: at 16 kbit/s Opus smears one tone into the
#: next and most marks fail their CRC (at 24 and up, 20 of 20 read back)
MARK_MIN_BITRATE = 24_000
FADE = 48  #: 1 ms raised-cosine edges on each symbol, so a tone change does not splatter


def crc8(value: int) -> int:
    """CRC-8 (polynomial 0x07, as ATM HEC and SMBus) of ``value``'s three bytes."""
    crc = 0
    for byte in (value & TIME_MASK).to_bytes(3, "big"):
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def encode(sent_ms: int) -> list[int]:
    """The mark's symbols for send time ``sent_ms``: sync, then 8 nibbles (time, CRC)."""
    word = ((sent_ms & TIME_MASK) << 8) | crc8(sent_ms)
    return [SYNC] + [(word >> (28 - 4 * k)) & 0xF for k in range(DATA_SYMBOLS)]


def decode(symbols: list[int]) -> int | None:
    """The send time (ms modulo 2**24) of a mark's 8 data symbols, or None if the CRC fails."""
    if len(symbols) != DATA_SYMBOLS or any(not 0 <= s < 16 for s in symbols):
        return None
    word = 0
    for s in symbols:
        word = (word << 4) | s
    value = word >> 8
    return value if crc8(value) == word & 0xFF else None


def unwrap(sent: int, now_ms: int) -> int:
    """The full ms time nearest ``now_ms`` whose low 24 bits are ``sent``."""
    return stamp.unwrap(sent, now_ms, TIME_BITS)


def tone(frequency: float, amplitude: float, samples: int = FRAME) -> np.ndarray:
    """One symbol: ``samples`` of a sine with faded edges, as int16."""
    t = np.arange(samples) / RATE
    wave = np.sin(2 * math.pi * frequency * t) * amplitude
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0, math.pi, FADE))
    wave[:FADE] *= ramp
    wave[-FADE:] *= ramp[::-1]
    return wave.astype(np.int16)


class MarkWriter:
    """The sender's side: which frames carry a mark, and their samples."""

    def __init__(self, amplitude: float, every: int = MARK_EVERY, first: int = 10) -> None:
        self._amplitude = amplitude
        self._every = every
        self._first = first
        self._tones = {s: tone(f, amplitude) for s, f in enumerate(DATA_TONES)}
        self._tones[SYNC] = tone(SYNC_TONE, amplitude)
        self._pending: list[int] = []
        self.marks = 0

    def frame(self, n: int, now_ms: int) -> np.ndarray | None:
        """Frame ``n``'s samples if it carries a symbol of a mark (None: the plain tone). A mark
        starts on every ``every``-th frame and carries ``now_ms``, that frame's send time."""
        if n >= self._first and (n - self._first) % self._every == 0:
            self._pending = encode(now_ms)
            self.marks += 1
        if not self._pending:
            return None
        return self._tones[self._pending.pop(0)]


class SymbolDetector:
    """Goertzel filters (as one matrix product) at the 17 tones of a 20 ms frame."""

    def __init__(self, samples: int = FRAME) -> None:
        t = np.arange(samples) / RATE
        tones = (*DATA_TONES, SYNC_TONE)
        phase = 2 * math.pi * np.outer(tones, t)
        self._basis = np.vstack([np.cos(phase), np.sin(phase)]).astype(np.float32)
        self._sync = self._basis[[SYNC, SYNC + len(tones)]]
        self._samples = samples

    def sync_share(self, mono: np.ndarray) -> float:
        """The share of the frame's energy at the sync tone alone: two filters, not 34, for
        the 49 frames a second that carry no mark."""
        if mono.size != self._samples:
            return 0.0
        x = mono.astype(np.float32)
        power = float(x @ x)
        if power <= 0:
            return 0.0
        c, s = self._sync @ x
        return float(c * c + s * s) * 2 / (self._samples * power)

    def symbol(self, mono: np.ndarray) -> int | None:
        """The frame's symbol (0..15, SYNC), or None: no tone of ours holds the frame."""
        if mono.size != self._samples:
            return None
        x = mono.astype(np.float32)
        power = float(x @ x)
        if power <= 0:
            return None
        proj = (self._basis @ x).astype(np.float64)
        n = len(proj) // 2
        energy = proj[:n] ** 2 + proj[n:] ** 2
        share = energy * 2 / (self._samples * power)
        order = np.argsort(share)
        best, second = int(order[-1]), float(share[order[-2]])
        if share[best] < MIN_SHARE or share[best] < RATIO * second:
            return None
        return best


@dataclass(frozen=True)
class Mark:
    sent_ms: int  #: the send time, ms modulo 2**24
    at: float  #: when its sync frame was delivered here


class MarkReader:
    """The receiver's side: reads marks back from consecutive decoded frames."""

    def __init__(self, samples: int = FRAME) -> None:
        self._detector = SymbolDetector(samples)
        self._start: float | None = None
        self._symbols: list[int] = []
        self._next_pts: int | None = None

    def frame(self, mono: np.ndarray, pts: int | None, now: float) -> Mark | None:
        """Take one frame (its first channel), with its pts (to see a lost frame) and delivery
        time; a mark when this frame completes one."""
        if pts is not None and self._next_pts is not None and pts != self._next_pts:
            self._start = None  # a frame lost (or repeated) breaks the mark it was in
        self._next_pts = pts + mono.size if pts is not None else None
        if self._start is None:  # waiting for a mark: only its sync tone can start one
            if self._detector.sync_share(mono) >= MIN_SHARE:
                self._start, self._symbols = now, []
            return None
        symbol = self._detector.symbol(mono)
        if symbol == SYNC:
            if self._symbols:  # a new mark's sync where data was due: start again
                self._start, self._symbols = now, []
            return None  # (a sync over two frames keeps the first one's time)
        if symbol is None:
            self._start = None
            return None
        self._symbols.append(symbol)
        if len(self._symbols) < DATA_SYMBOLS:
            return None
        start, symbols = self._start, self._symbols
        self._start, self._symbols = None, []
        sent = decode(symbols)
        return Mark(sent, start) if sent is not None else None
