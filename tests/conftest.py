"""Shared fixtures. Lab fixtures: see tests/labenv.py and scripts/lab."""

from __future__ import annotations

import shutil
from typing import Iterator

import labenv
import pytest


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
