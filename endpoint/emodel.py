"""A call score: MOS from the ITU-T G.107 E-model, in the simplified form most tools use
(Cole and Rosenbluth, "Voice over IP performance monitoring", 2001; as SIPp's rtcp_qos and
rtcscore), from what the receiving device measured of the audio.

    R   = R0 - Id - Ie_eff                      (Is and A of G.107 left out: 0)
    R0  = 93.2                                  (G.107 default values)
    Id  = 0.024 d + 0.11 (d - 177.3) H(d - 177.3)
    d   = one-way delay, ms: the measured audio latency (mark sent -> decoded here, p50) plus the
          playout buffer a receiver would hold for the jitter (2 x jitter, as rtcscore)
    Ie_eff = Ie + (95 - Ie) Ppl / (Ppl + Bpl)   (G.107 7.2, random loss: BurstR = 1)
    Ie  = 0                                     (Opus at 32 kbit/s codes the test tone cleanly;
                                                 G.113 lists no Opus value)
    Bpl = 4.3                                   (G.113 Appendix I, G.711 without packet-loss
                                                 concealment: aiortc's receiver conceals none)
    Ppl = audio frames lost / frames sent, in %
    MOS = 1 + 0.035 R + 7e-6 R (R - 60) (100 - R)     for 0 < R < 100 (1 below, 4.5 above)

An unimpaired call (50 ms, no loss) scores 4.4; 150 ms alone 4.3; 1 % loss 3.8; 5 % 2.1.
"""

from __future__ import annotations

R0 = 93.2
IE = 0.0
BPL = 4.3


def delay_impairment(d_ms: float) -> float:
    """G.107's Id in its usual simplification, for one-way delay ``d_ms``."""
    return 0.024 * d_ms + (0.11 * (d_ms - 177.3) if d_ms > 177.3 else 0.0)


def loss_impairment(loss_percent: float, ie: float = IE, bpl: float = BPL) -> float:
    """G.107's Ie,eff for random loss of ``loss_percent`` %."""
    ppl = max(0.0, loss_percent)
    return ie + (95 - ie) * ppl / (ppl + bpl)


def r_to_mos(r: float) -> float:
    """G.107 Annex B: MOS (conversational quality, estimated) from R."""
    if r <= 0:
        return 1.0
    if r >= 100:
        return 4.5
    return 1 + 0.035 * r + 7e-6 * r * (r - 60) * (100 - r)


def mos(latency_ms: float, jitter_ms: float, loss_percent: float) -> float:
    """The estimated MOS of a call direction's audio (see the module's text for the inputs)."""
    d = max(0.0, latency_ms) + 2 * max(0.0, jitter_ms)
    return r_to_mos(R0 - delay_impairment(d) - loss_impairment(loss_percent))
