"""A full disk under nsvpn's own files, without the lab: /dev/full fails every write with
ENOSPC. The pcap writer refuses a full disk up front and stops (without raising) when the disk
fills mid-run; a log handler that cannot write says so once on stderr, not a traceback per
record; an OSError that escapes to the command line is one line, exit 4 (tests/
test_tmpfull_lab.py runs the real commands on a full tmpfs)."""

from __future__ import annotations

import errno
import logging
import os

import pytest

from nsvpn import cli, logerrors
from nsvpn.pcap import PcapWriter

try:
    from builtins import BaseExceptionGroup, ExceptionGroup  # 3.11+
except ImportError:  # 3.9/3.10: trio's backport
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup


def test_pcap_on_full_disk_is_refused_at_open():
    with pytest.raises(OSError) as e:
        PcapWriter("/dev/full", 10**6)
    assert e.value.errno == errno.ENOSPC


def test_pcap_disk_fills_mid_run(tmp_path, caplog):
    w = PcapWriter(str(tmp_path / "x.pcap"), 10**7)
    w._f.close()
    w._f = open("/dev/full", "wb")  # noqa: SIM115 - the disk is now full
    for _ in range(100):
        w.packet(b"\0" * 10 + b"x" * 1400)  # must not raise
    s = w.stats()
    assert s["error"] == os.strerror(errno.ENOSPC) and not s["full"]
    assert s["packets"] < 10
    assert [r.getMessage() for r in caplog.records if "cannot write" in r.getMessage()][0]
    w.packet(b"\0" * 20)
    w.close()
    assert w.stats()["packets"] == s["packets"]


def test_log_handler_on_full_disk_warns_once(capfd):
    h = logging.StreamHandler(open("/dev/full", "w"))  # noqa: SIM115
    lg = logging.getLogger("nsvpn.test.full")
    lg.addHandler(h)
    lg.propagate = False
    saved = logging.Handler.handleError
    os.environ.pop("NSVPN_DEBUG", None)
    try:
        logerrors.install()
        for i in range(50):
            lg.warning("line %d %s", i, "x" * 200)
    finally:
        logging.Handler.handleError = saved
        lg.removeHandler(h)
        try:
            h.stream.close()
        except OSError:
            pass
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err, err
    assert err.count("nsvpn: warning: cannot write the log") == 1, err
    assert "No space left on device" in err


def test_os_error_in_an_exception_group_is_one_line(capsys, monkeypatch):
    def boom(args):
        inner = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/tmp/nsvpn-1-x")
        raise BaseExceptionGroup("nursery", [ExceptionGroup("inner", [inner])])

    monkeypatch.delenv("NSVPN_DEBUG", raising=False)
    monkeypatch.setattr(cli, "_probe", boom)
    assert cli.main(["probe"]) == cli.EXIT_SETUP
    err = capsys.readouterr().err
    assert err == ("nsvpn: No space left on device: '/tmp/nsvpn-1-x' (NSVPN_DEBUG=1 shows "
                   "where)\n"), err


def test_other_errors_stay_internal(capsys, monkeypatch):
    def boom(args):
        raise ExceptionGroup("nursery", [OSError(errno.EIO, "x"), KeyError("y")])

    monkeypatch.delenv("NSVPN_DEBUG", raising=False)
    monkeypatch.setattr(cli, "_probe", boom)
    assert cli.main(["probe"]) == cli.EXIT_INTERNAL
    assert "internal error" in capsys.readouterr().err
