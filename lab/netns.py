"""A network namespace of our own, joined to the host by a veth pair: a server (and its devices)
run inside it, so the one link between it and the host crosses the veth, where packets can be
dropped (iptables: this kernel has no netem), the link cut, or its rate limited (tbf), without
touching any other link. Used by the local stack (``isolate``), the probe's fault plans
(probe/nemesis.py) and the tests.

Addresses come from 198.18.0.0/15, the range set aside for benchmarking (RFC 2544): namespace
``k`` gets 198.18.k.0/30 (host end .1, inside .2). Everything made is removed by :func:`namespace`
on the way out; iptables rules and qdiscs inside the namespace go with it, and the host end's
qdisc goes with its veth. Needs root, ``ip`` (iproute2) and, for faults, ``iptables`` and ``tc``.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass


class NamespaceError(RuntimeError):
    """A namespace or a fault on it could not be made here; the message says why."""


@dataclass(frozen=True)
class Namespace:
    name: str
    host_if: str
    inside_if: str
    host_ip: str
    inside_ip: str

    def prefix(self) -> list[str]:
        """Argv prefix that runs a command inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def run(self, *argv: str) -> None:
        _run([*self.prefix(), *argv])

    # ------------------------------------------------------------------ faults on the veth

    def drop(self, probability: float) -> None:
        """Drop this share of UDP packets crossing the veth, each way, at random."""
        for chain, flag in (("INPUT", "-i"), ("OUTPUT", "-o")):
            self.run("iptables", "-A", chain, flag, self.inside_if, "-p", "udp", "-m",
                     "statistic", "--mode", "random", "--probability", str(probability),
                     "-j", "DROP")

    def cut(self, keep_tcp_port: int | None = None) -> None:
        """Drop every packet crossing the veth, each way; with ``keep_tcp_port``, except TCP to
        and from that port inside (the probe's HTTP to the server inside: the link cut is the
        server's to the host's, not the probe's way in)."""
        for chain, flag, port_flag in (("INPUT", "-i", "--dport"), ("OUTPUT", "-o", "--sport")):
            if keep_tcp_port is not None:
                self.run("iptables", "-A", chain, flag, self.inside_if, "-p", "tcp", port_flag,
                         str(keep_tcp_port), "-j", "ACCEPT")
            self.run("iptables", "-A", chain, flag, self.inside_if, "-j", "DROP")

    def heal(self) -> None:
        """Remove every rule :meth:`drop` and :meth:`cut` added."""
        for chain in ("INPUT", "OUTPUT"):
            self.run("iptables", "-F", chain)

    def limit_rate(self, kbit: int, latency_ms: int = 200) -> None:
        """Limit the veth to ``kbit`` kbit/s each way (tbf: a token bucket, queueing at most
        ``latency_ms`` of traffic, dropping past it), as a narrow link would."""
        for prefix, dev in (([], self.host_if), (self.prefix(), self.inside_if)):
            _run([*prefix, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
                  f"{kbit}kbit", "burst", "4kb", "latency", f"{latency_ms}ms"])

    def unlimit(self) -> None:
        for prefix, dev in (([], self.host_if), (self.prefix(), self.inside_if)):
            subprocess.run([*prefix, "tc", "qdisc", "del", "dev", dev, "root"],
                           capture_output=True, timeout=30)

    def link_stats(self) -> dict[str, dict[str, int]]:
        """The rate limit's counters each way: ``out`` (from the namespace: its veth end) and
        ``in`` (into it: the host's end): bytes and packets sent, packets dropped, and the
        bytes queued now (tc -s)."""
        out = {}
        for way, prefix, dev in (("out", self.prefix(), self.inside_if), ("in", [], self.host_if)):
            out[way] = qdisc_stats(subprocess.run(
                [*prefix, "tc", "-s", "qdisc", "show", "dev", dev], check=True,
                capture_output=True, text=True, timeout=30).stdout)
        return out

    def dropped(self) -> int:
        """Packets the drop rules took so far (both ways)."""
        out = subprocess.run([*self.prefix(), "iptables", "-L", "-v", "-n", "-x"],
                             check=True, capture_output=True, text=True, timeout=30).stdout
        return sum(int(line.split()[0]) for line in out.splitlines()
                   if "DROP" in line and "statistic" in line)


def qdisc_stats(text: str) -> dict[str, int]:
    """What ``tc -s qdisc show`` says of the first qdisc: bytes, packets, dropped, backlog."""
    words = text.replace(",", " ").replace("(", " ").replace(")", " ").split()

    def after(word: str, skip: int = 1) -> int:
        return _size(words[words.index(word) + skip]) if word in words else 0

    return {"bytes": after("Sent"), "packets": after("Sent", 3), "dropped": after("dropped"),
            "backlog": after("backlog")}


def _size(text: str) -> int:
    """A tc figure: 123, 4b, 5Kb, 6Mb (bytes)."""
    scale = {"b": 1, "Kb": 1000, "Mb": 1000_000, "Gb": 1000_000_000}
    for unit in ("Gb", "Mb", "Kb", "b"):
        if text.endswith(unit):
            return int(float(text[:-len(unit)]) * scale[unit])
    return int(text) if text.isdigit() else 0


def _run(argv: list[str]) -> None:
    try:
        subprocess.run(argv, check=True, capture_output=True, timeout=30)
    except subprocess.CalledProcessError as exc:
        raise NamespaceError(f"{' '.join(argv)}: {exc.stderr.decode(errors='replace')[-300:]}"
                             ) from None


def need(tool: str, package: str) -> None:
    """``tool`` on the PATH, installing Debian's ``package`` if missing; NamespaceError if not."""
    if shutil.which(tool):
        return
    done = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", package],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if done.returncode != 0 or not shutil.which(tool):
        raise NamespaceError(f"{tool} is not installed and installing {package} failed: "
                             f"{done.stderr[-300:]}")


def _block_in_use(k: int) -> bool:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True,
                         timeout=30).stdout
    return f" 198.18.{k}." in out


@contextlib.contextmanager
def namespace() -> Iterator[Namespace]:
    """A new namespace joined to the host by a veth (addresses in a 198.18.k.0/30 no interface
    of this host uses yet); removed, with everything in it, on the way out."""
    if os.geteuid() != 0:
        raise NamespaceError("network namespaces need root")
    need("ip", "iproute2")
    tag = uuid.uuid4().hex[:6]
    blocks = [k for k in random.sample(range(1, 255), 254) if not _block_in_use(k)]
    if not blocks:
        raise NamespaceError("no free 198.18.k.0/30 block left on this host")
    k = blocks[0]
    ns = Namespace(f"vph-{tag}", f"vph{tag}a", f"vph{tag}b", f"198.18.{k}.1", f"198.18.{k}.2")
    made: list[list[str]] = []

    def ip(*argv: str) -> None:
        _run(["ip", *argv])

    try:
        ip("netns", "add", ns.name)
        made.append(["netns", "del", ns.name])
        ip("link", "add", ns.host_if, "type", "veth", "peer", "name", ns.inside_if)
        made.append(["link", "del", ns.host_if])
        ip("link", "set", ns.inside_if, "netns", ns.name)
        ip("addr", "add", f"{ns.host_ip}/30", "dev", ns.host_if)
        ip("link", "set", ns.host_if, "up")
        ns.run("ip", "addr", "add", f"{ns.inside_ip}/30", "dev", ns.inside_if)
        ns.run("ip", "link", "set", ns.inside_if, "up")
        ns.run("ip", "link", "set", "lo", "up")
        yield ns
    finally:
        for argv in reversed(made):
            subprocess.run(["ip", *argv], capture_output=True, timeout=30)
