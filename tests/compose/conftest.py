"""The lab of docker-compose.yml, brought up once for the compose tests (tests/compose/run builds
the image and starts the engine; without VPHONE_COMPOSE_TESTS these tests skip)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from wire.auth import Auth

ROOT = Path(__file__).resolve().parents[2]
DEVICES_PER_SERVER = 3
SECRET = "compose-test-secret"  #: auth is on in the lab, as by default

if not os.environ.get("VPHONE_COMPOSE_TESTS"):
    pytest.skip("compose tests run through tests/compose/run (it builds the images)",
                allow_module_level=True)


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return [os.environ.get("DOCKER", "docker"), "compose"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Lab:
    project: str
    ports: dict[str, int]
    env: dict[str, str] = field(default_factory=dict)
    files: tuple[str, ...] = ("docker-compose.yml",)
    root: str = "upper"  #: the server at the top of the lab's tree
    devices: int = 2 * DEVICES_PER_SERVER  #: devices in the whole lab

    def _command(self) -> list[str]:
        return [*compose_command(), "-p", self.project,
                *(a for f in self.files for a in ("-f", f))]

    def compose(self, *args: str, timeout: float = 300, check: bool = True
                ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*self._command(), *args], cwd=ROOT,
                              env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"compose {' '.join(args)} exited {done.returncode}:\n"
                               f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        return done

    def url(self, server: str) -> str:
        return f"http://127.0.0.1:{self.ports[server]}"

    def get(self, server: str, path: str, timeout: float = 5) -> Any:
        token = Auth(SECRET.encode()).token("probe")
        request = urllib.request.Request(self.url(server) + path,
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if path != "/metrics" else body.decode()

    def probe(self, name: str, *args: str, timeout: float = 300,
              volumes: tuple[str, ...] = ()) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
        """Run the probe service with ``args`` (its --out is /results/NAME; ``volumes``: more
        HOST:CONTAINER mounts); its exit status, its JSON summary, and its per-call records."""
        mounts = [a for v in volumes for a in ("-v", v)]
        done = self.compose("run", "--rm", "-T", "--no-deps", *mounts, "probe", "probe", *args,
                            "--json", "--out", f"/results/{name}", timeout=timeout,
                            check=False)
        try:
            summary = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise RuntimeError(f"probe gave no JSON (exit {done.returncode}):\n"
                               f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}") from None
        return done.returncode, summary, self.calls(name)

    def probe_background(self, name: str, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*self._command(), "run", "--rm", "-T", "--no-deps", "probe",
             "probe", *args, "--json", "--out", f"/results/{name}"],
            cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def calls(self, name: str) -> list[dict[str, Any]]:
        done = self.compose("run", "--rm", "-T", "--no-deps", "--entrypoint", "cat", "probe",
                            f"/results/{name}/calls.jsonl", check=False)
        return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except OSError as exc:  # a server not up yet
                last = exc
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout} s waiting for {what} ({last!r})")

    def devices_registered(self) -> int:
        return len(self.get(self.root, "/v1/devices")["devices"])

    def wait_devices(self, count: int | None = None, timeout: float = 60) -> None:
        count = self.devices if count is None else count
        self.wait_for(lambda: self.devices_registered() == count, timeout,
                      f"{count} devices registered at {self.root}")

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def inspect(self, service: str, template: str) -> str:
        docker = os.environ.get("DOCKER", "docker")
        return subprocess.run([docker, "inspect", "-f", template, self.container(service)],
                              capture_output=True, text=True, check=True).stdout.strip()


@contextlib.contextmanager
def running_lab(lab: Lab, services: list[str]) -> Iterator[Lab]:
    """Bring the lab's services up, wait for every device, and take it all down after (the
    logs are kept in VPHONE_COMPOSE_LOGS, /tmp by default)."""
    try:
        lab.compose("up", "-d", *services, timeout=600)
        lab.wait_devices(timeout=120)
        yield lab
    finally:
        logs = lab.compose("logs", "--no-color", "--tail", "300", check=False).stdout
        (Path(os.environ.get("VPHONE_COMPOSE_LOGS", "/tmp")) / f"{lab.project}.log").write_text(
            logs)
        lab.compose("down", "-v", "--remove-orphans", "-t", "5", check=False, timeout=300)


def lab_env(ports: dict[str, int]) -> dict[str, str]:
    return {**os.environ, "VPHONE_IMAGE": os.environ.get("VPHONE_IMAGE", "vphone:test"),
            **{f"{name.upper().replace('-', '_')}_PORT": str(port)
               for name, port in ports.items()},
            "DEVICES_PER_SERVER": str(DEVICES_PER_SERVER), "CI": "true",
            "VPHONE_AUTH_SECRET": SECRET}


TREE_SERVERS = ("root", "mid-1", "mid-2", "lower-a1", "lower-a2", "lower-b1", "lower-b2")


@pytest.fixture(scope="module")
def tree_lab() -> Iterator[Lab]:
    """docker-compose.tree.yml: root, two mid servers, four lower servers, their devices."""
    ports = {name: free_port() for name in TREE_SERVERS}
    lab = Lab(f"vphonetree{os.getpid()}", ports, lab_env(ports),
              files=("docker-compose.tree.yml",), root="root", devices=4 * DEVICES_PER_SERVER)
    devices = [f"devices-{n.split('-')[1]}" for n in TREE_SERVERS if n.startswith("lower")]
    with running_lab(lab, [*TREE_SERVERS, *devices]) as running:
        yield running


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    ports = {"upper": free_port(), "lower-a": free_port(), "lower-b": free_port()}
    lab = Lab(f"vphonetest{os.getpid()}", ports, lab_env(ports))
    with running_lab(lab, ["upper", "lower-a", "lower-b", "devices-a", "devices-b"]) as running:
        yield running
