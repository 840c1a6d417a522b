"""The forwarding fast path's per-packet work, timed on its own: hot, and spaced like real media.

    .venv/bin/python benchmarks/packet_path.py [--packets 3000] [--spacing-ms 0,0.1,0.4,1.5]
        [--estimate]

Per packet, as rtc/adapter.py and relay/forward.py do it: SRTP unprotect in place, the receiver
accounting aiortc needs (RTCP statistics, NACK generator), the sequence/timestamp map, the header
rewrite in the outgoing SRTP buffer, the NACK history copy, SRTP protect, the RTCP sender clock
(every 8th packet).
No sockets. With packets back to back, the caches stay warm. Spaced as media arrives at a lightly
loaded relay (one packet every ~1.5 ms at 4 streams), every packet starts cold: that is most of
the gap between this figure and what the relay spends per packet at low stream counts
(benchmarks/forwarding.py). Each spaced run is done twice: with the CPU idle between packets
(sleeping, as a relay waits for the next datagram) and kept busy (spinning): the difference is
what waking an idle CPU costs on this machine.
"""

from __future__ import annotations

import argparse
import os
import time

from aiortc.rtcrtpreceiver import NackGenerator, StreamStatistics
from pylibsrtp import Policy, Session
from pylibsrtp._binding import ffi

from rtc.adapter import _HEADER, InPlaceSrtp, _Seen, ntp_now
from rtc.congestion import Estimate
from rtc.rtp import SequenceMap


def packets(count: int) -> tuple[Session, list[bytes]]:
    key = os.urandom(30)
    sender = Session(Policy(key=key, ssrc_type=Policy.SSRC_ANY_OUTBOUND))
    receiver = Session(Policy(key=key, ssrc_type=Policy.SSRC_ANY_INBOUND))
    made = []
    for i in range(count):
        frame = i // PACKETS_PER_FRAME  # 30 fps
        marker = 0x80 if i % PACKETS_PER_FRAME == PACKETS_PER_FRAME - 1 else 0
        header = (bytes([0x90, 96 | marker]) + (i & 0xFFFF).to_bytes(2, "big")
                  + (frame * 3000 & 0xFFFFFFFF).to_bytes(4, "big") + (1234).to_bytes(4, "big"))
        # one-byte extensions: MID, and abs-send-time (id 3) as aiortc's senders write it
        sent = round(frame / 30 * (1 << 18)) & 0xFFFFFF
        header_extension = bytes([0xBE, 0xDE, 0, 2, 0x10, 0x31, 0x32]) + sent.to_bytes(3, "big") \
            + bytes(2)
        made.append(sender.protect(header + header_extension + os.urandom(1100)))
    return receiver, made


PACKETS_PER_FRAME = 4  #: ~1 Mbit/s of 640x480 VP8 at 30 fps


def spin(seconds: float) -> None:
    """Wait without letting the CPU go idle."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def run(count: int, spacing: float, busy: bool = False, estimate: bool = False) -> float:
    """Mean CPU time (µs) of the per-packet work, ``spacing`` seconds between packets, the CPU
    idle in between (or ``busy``: spinning); with ``estimate``, congestion control's part too
    (rtc/congestion.py: the bandwidth estimate fed by every packet)."""
    receiver, datagrams = packets(count)
    rx = InPlaceSrtp(receiver)
    out = InPlaceSrtp(Session(Policy(key=os.urandom(30), ssrc_type=Policy.SSRC_ANY_OUTBOUND)))
    seq_map = SequenceMap(1, 1)
    seq_map.restart(0, 0)
    stats, nacks, seen = StreamStatistics(90000), NackGenerator(), _Seen()
    spent = 0.0
    history: dict[int, bytes] = {}
    count_ = 0
    estimator = Estimate(3) if estimate else None
    frame_bytes = 0
    for datagram in datagrams:
        if spacing:
            (spin if busy else time.sleep)(spacing)
        start = time.thread_time()
        length = rx.unprotect(datagram)
        assert length is not None
        plain = rx.view
        seq, ts = (plain[2] << 8) | plain[3], int.from_bytes(plain[4:8], "big")
        seen.sequence_number, seen.timestamp = seq, ts
        stats.add(seen)  # type: ignore[arg-type]
        if estimator is not None:
            frame_bytes += length
            if plain[1] & 0x80:  # as relay/forward.py: a frame noted, on its last packet
                estimator.packet(plain, length, int(time.monotonic() * 1000), frame_bytes)
                frame_bytes = 0
                if not (count_ + 1) % (3 * PACKETS_PER_FRAME):  # and a tick's frames (3)
                    estimator.drain()
        nacks.add(seen)  # type: ignore[arg-type]
        mapped = seq_map.map(seq, ts)
        assert mapped is not None
        ffi.memmove(out.buffer, plain[:length], length)
        _HEADER.pack_into(out.view, 1, (plain[1] & 0x80) | 97, mapped[0], mapped[1], 999)
        history[mapped[0] % 128] = bytes(out.view[:length])
        out.protect(length)
        if not count_ & 7:
            ntp_now()
        count_ += 1
        spent += time.thread_time() - start
    return spent / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packets", type=int, default=3000)
    parser.add_argument("--spacing-ms", default="0,0.1,0.4,1.5",
                        help="comma-separated gaps between packets, in ms")
    parser.add_argument("--estimate", action="store_true",
                        help="each figure also with congestion control's per-packet estimate")
    args = parser.parse_args()
    for spacing in (float(v) for v in args.spacing_ms.split(",")):
        for estimate in (False, True) if args.estimate else (False,):
            idle = run(args.packets, spacing / 1000, estimate=estimate)
            line = (f"packets {spacing:4.1f} ms apart{', estimated' if estimate else ''}: "
                    f"{idle:6.1f} µs of CPU per packet")
            if spacing:
                busy = run(args.packets, spacing / 1000, busy=True, estimate=estimate)
                line += f" (CPU idle between them); {busy:6.1f} µs (CPU kept busy)"
            print(line)


if __name__ == "__main__":
    main()
