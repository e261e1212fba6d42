"""Real SOCKS5 servers on loopback for tests that need no lab: microsocks (CONNECT only) and
Dante (CONNECT and UDP ASSOCIATE). The fixtures themselves live in conftest.py."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Callable, List

import pytest

MICROSOCKS = shutil.which("microsocks") or "/usr/bin/microsocks"
DANTED = shutil.which("danted") or "/usr/sbin/danted"
need_microsocks = pytest.mark.skipif(
    not os.path.exists(MICROSOCKS), reason="microsocks is not installed"
)
need_danted = pytest.mark.skipif(not os.path.exists(DANTED), reason="danted is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, what: str) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{what} did not come up")


class Servers:
    """Started servers (each in its own process group: dante forks), killed at the end."""

    def __init__(self, start: Callable[..., int]) -> None:
        self._start = start
        self.procs: List[subprocess.Popen] = []

    def __call__(self, *args: str) -> int:
        return self._start(self, *args)

    def spawn(self, argv: List[str]) -> subprocess.Popen:
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        self.procs.append(p)
        return p

    @staticmethod
    def kill(p: subprocess.Popen) -> None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()

    def stop_all(self) -> None:
        for p in self.procs:
            self.kill(p)


def start_microsocks(servers: Servers, *args: str) -> int:
    port = free_port()
    servers.spawn([MICROSOCKS, "-i", "127.0.0.1", "-p", str(port), *args])
    wait_listening(port, "microsocks")
    return port


def start_danted(servers: Servers, conf_dir: str) -> int:
    port = free_port()
    conf = os.path.join(conf_dir, f"danted-{port}.conf")
    with open(conf, "w") as f:
        f.write(f"internal: 127.0.0.1 port = {port}\nexternal: 127.0.0.1\n"
                "socksmethod: none\nclientmethod: none\n"
                + ("user.unprivileged: nobody\n" if os.geteuid() == 0 else "")
                + "client pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }\n"
                "socks pass { from: 127.0.0.0/8 to: 0.0.0.0/0 "
                "command: connect udpassociate udpreply }\n")
    servers.spawn([DANTED, "-f", conf, "-p", "/dev/null"])
    wait_listening(port, "danted")
    return port
