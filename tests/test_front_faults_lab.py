"""Faults in preload mode (issue 8): the upstream dies mid-transfer while the front relays a
program's connection. The program must see a reset (never an orderly EOF that makes a cut file
look complete) within seconds, and a new connection works once the upstream is back."""
from __future__ import annotations

import os
import signal

import labenv
import pytest
from test_faults_lab import _transfer, comm, descendants, ssh_url

pytestmark = pytest.mark.lab


def test_preload_ssh_killed_mid_transfer_resets_the_program(nsvpn_lab: labenv.Lab,
                                                            user_tmp: str):
    seen = {}

    def kill(p):
        sshs = [c for c in descendants(p.pid) if comm(c) == "ssh"]
        assert sshs, "no ssh child of nsvpn"
        seen["old"] = sshs
        for c in sshs:
            os.kill(c, signal.SIGKILL)

    res = _transfer(nsvpn_lab, user_tmp, ["--mode", "preload", "-q", "--via",
                                          ssh_url(nsvpn_lab)], kill, lambda: None,
                    "preload, ssh killed:")
    assert seen["old"]
    assert res["end"] == "ConnectionResetError", res
