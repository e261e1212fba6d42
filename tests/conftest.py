"""Shared fixtures. Lab fixtures: see tests/labenv.py and scripts/lab."""

from __future__ import annotations

import shutil
import socket
from functools import partial
from typing import Iterator

import labenv
import peers
import pytest
import trio


@pytest.fixture(scope="session")
def lab() -> labenv.Lab:
    """The secluded-node lab, brought up once per session with `scripts/lab up`.

    Skips when the machine cannot run it (not root, `scripts/lab install` not run); a lab
    that should come up but does not is an error. The lab is deliberately left up at the
    end of the session: bringing it up again is fast, humans can inspect it after a
    failure, and CI tears it down with `scripts/lab down`."""
    reason = labenv.why_unavailable()
    if reason:
        pytest.skip(reason)
    try:
        return labenv.bring_up()
    except labenv.LabError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def nsvpn_lab(lab: labenv.Lab) -> labenv.Lab:
    """The lab, plus a check that the test user can run the nsvpn of NSVPN_VENV
    (default /opt/nsvpn-venv) and that it matches the working tree. Fails, not skips:
    end-to-end tests silently skipped (or run against stale code) would prove nothing."""
    problem = lab.nsvpn_problem()
    if problem:
        pytest.fail(problem, pytrace=False)
    return lab


@pytest.fixture
def user_tmp(lab: labenv.Lab) -> Iterator[str]:
    """A scratch directory owned by the test user (pytest's tmp_path belongs to root)."""
    d = lab.user_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True)
def _stop_lab_processes() -> Iterator[None]:
    """Background processes a test started with lab.popen() never outlive it."""
    yield
    labenv.stop_all()


@pytest.fixture
def microsocks() -> Iterator[peers.Servers]:
    """`microsocks(*args)` starts one on loopback and returns its port."""
    servers = peers.Servers(peers.start_microsocks)
    yield servers
    servers.stop_all()


@pytest.fixture
def danted(tmp_path) -> Iterator[peers.Servers]:
    """`danted()` starts a Dante SOCKS5 server (with UDP ASSOCIATE) on loopback and returns
    its port; `danted.kill(danted.procs[i])` ends one with all its children."""
    servers = peers.Servers(partial(peers.start_danted, conf_dir=str(tmp_path)))
    yield servers
    servers.stop_all()


@pytest.fixture
async def udp_echo(nursery) -> int:
    """The port of a UDP echo server on 127.0.0.1."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))

    async def serve() -> None:
        with sock:
            while True:
                data, addr = await sock.recvfrom(65535)
                await sock.sendto(data, addr)

    nursery.start_soon(serve)
    return sock.getsockname()[1]
