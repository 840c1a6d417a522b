"""A WHIP publisher nobody here wrote: FFmpeg's ``whip`` muxer (the FFmpeg PyAV bundles),
publishing an H.264 test picture (and, with --audio, an Opus tone) to a WHIP URL, in its own
process as OBS or ``ffmpeg -f whip`` would be.

    python tests/whip_publisher.py URL SECONDS [--token T] [--cert PEM --key PEM] [--audio]

FFmpeg's DTLS keys are its own; the one PyAV 18's FFmpeg makes is on P-224, which the OpenSSL
of aiortc's stack (4.x) refuses, so a test gives it a P-256 certificate (``cert_file``,
``key_file``: FFmpeg's own options). It prints one JSON line: frames sent, seconds.
"""

from __future__ import annotations

import argparse
import fractions
import json
import time

import av
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("seconds", type=float)
    parser.add_argument("--token")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--audio", action="store_true")
    parser.add_argument("--fps", type=int, default=15)
    args = parser.parse_args()
    options = {"handshake_timeout": "5000"}
    if args.token:
        options["authorization"] = args.token
    if args.cert and args.key:
        options.update(cert_file=args.cert, key_file=args.key)
    out = av.open(args.url, "w", format="whip", options=options)
    video = out.add_stream("libx264", rate=args.fps)
    video.width, video.height, video.pix_fmt = 320, 240, "yuv420p"
    # Baseline, no B-frames, a keyframe a second: FFmpeg's WHIP answers no PLI, so a call
    # that joins waits for the next one.
    video.options = {"profile": "baseline", "tune": "zerolatency", "preset": "ultrafast",
                     "g": str(args.fps), "bf": "0"}
    video.time_base = fractions.Fraction(1, args.fps)
    audio = None
    if args.audio:
        audio = out.add_stream("libopus", rate=48000)
        audio.layout = "stereo"
    sent = 0
    samples = 0
    started = time.time()
    while time.time() - started < args.seconds:
        picture = np.zeros((240, 320, 3), dtype=np.uint8)
        picture[:, : (sent * 7) % 320] = (200, 60, 30)  # a bar that moves
        frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
        frame.pts = sent
        for packet in video.encode(frame):
            out.mux(packet)
        if audio is not None:
            n = 48000 // args.fps
            t = (np.arange(n) + samples) / 48000
            tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            aframe = av.AudioFrame.from_ndarray(np.stack([tone, tone]).reshape(1, -1),
                                                format="flt", layout="stereo")
            aframe.sample_rate, aframe.pts = 48000, samples
            samples += n
            for packet in audio.encode(aframe):
                out.mux(packet)
        sent += 1
        if sent == 1:  # the first mux did the WHIP handshake: pace from its end, no burst
            started = time.time() - 1 / args.fps
        time.sleep(max(0.0, started + sent / args.fps - time.time()))
    out.close()
    print(json.dumps({"frames": sent, "seconds": round(time.time() - started, 3)}), flush=True)


if __name__ == "__main__":
    main()
