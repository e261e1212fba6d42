"""The command line as a user meets it: usage errors, where the upstream comes from, bad URLs,
`nsvpn probe --json`. No privileges and no network beyond loopback: every case here fails (or
answers) before a namespace or an upstream outside this machine is involved.

Each test runs `python -m nsvpn` from the working tree in a fresh process with a clean
environment whose HOME and XDG_CONFIG_HOME point into tmp_path, so the caller's own
config file and NSVPN_VIA never leak in.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    (h / ".config").mkdir(parents=True)
    return h


def nsvpn(args: List[str], home: Path, env: Optional[Dict[str, str]] = None,
          timeout: float = 30.0) -> subprocess.CompletedProcess:
    e = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(REPO),
    }
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "nsvpn", *args], env=e, cwd=str(home),
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """stderr must be exactly one line (no traceback) and stdout empty."""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert r.stdout == "", r.stdout
    assert "Traceback" not in r.stderr
    return lines[0]


def write_config(home: Path, text: str) -> Path:
    p = home / ".config" / "nsvpn" / "config.toml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def closed_loopback_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------- usage


def test_no_command_prints_help_and_exits_2(home):
    r = nsvpn([], home)
    assert r.returncode == 2
    assert "exec" in r.stderr and "probe" in r.stderr


def test_version(home):
    from nsvpn import __version__

    r = nsvpn(["--version"], home)
    assert r.returncode == 0
    assert r.stdout.strip() == f"nsvpn {__version__}"


@pytest.mark.parametrize("args", [["exec"], ["exec", "--"], ["exec", "--via", "ssh://h", "--"]])
def test_exec_without_command(home, args):
    r = nsvpn(args, home)
    assert r.returncode == 2
    line = one_line_error(r)
    assert "no command given" in line and "-- CMD" in line


@pytest.mark.parametrize("args", [["exec", "--mode", "tunnel", "--", "true"],
                                  ["exec", "--bogus-option", "--", "true"],
                                  ["frobnicate"]])
def test_argparse_errors_exit_2(home, args):
    r = nsvpn(args, home)
    assert r.returncode == 2
    assert "usage:" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,words", [
    (["down"], "which tunnel"),
    (["down", "a", "--name", "b"], "two tunnel names"),
    (["status", "a", "--name", "b"], "two tunnel names"),
])
def test_tunnel_name_errors(home, args, words):
    r = nsvpn(args, home)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r


@pytest.mark.parametrize("how", [["gone"], ["--name", "gone"]])
def test_status_and_down_take_the_name_like_up(home, tmp_path, how):
    """`up --name N`; status and down take N or --name N alike."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    env = {"XDG_RUNTIME_DIR": str(run)}
    r = nsvpn(["status", *how], home, env=env)
    assert "gone" in r.stdout + r.stderr and "Traceback" not in r.stderr, r
    r = nsvpn(["down", *how], home, env=env)
    assert "no tunnel named gone" in r.stderr and "Traceback" not in r.stderr, r


def test_no_upstream_names_all_three_ways(home, tmp_path):
    marker = tmp_path / "ran"
    r = nsvpn(["exec", "--", "touch", str(marker)], home)
    assert r.returncode == 2
    line = one_line_error(r)
    assert line.startswith("nsvpn: ")
    assert "--via" in line and "NSVPN_VIA" in line
    assert str(home / ".config" / "nsvpn" / "config.toml") in line
    assert not marker.exists()


def test_empty_nsvpn_via_and_config_without_via_count_as_none(home):
    write_config(home, 'mode = "auto"\n')  # a config file without via (unknown keys are errors now)
    r = nsvpn(["exec", "--", "true"], home, env={"NSVPN_VIA": " , "})
    assert r.returncode == 2
    assert "NSVPN_VIA" in one_line_error(r)


# ------------------------------------------------------------------------- bad URLs


@pytest.mark.parametrize("url,words", [
    ("http://proxy:3128", ["unknown scheme", "http"]),
    ("edge.lab", ["not an upstream URL", "ssh://"]),
    ("ssh://", ["missing host"]),
    ("ssh://user@", ["missing host"]),
    ("socks5://h:99999", ["bad port", "99999"]),
    ("socks5://h:0", ["bad port"]),
    ("socks5://h:1080/path", ["no path"]),
    ("ssh://[::1", ["unterminated"]),
    ("ssh://a b", ["whitespace"]),
])
def test_bad_upstream_url(home, url, words):
    r = nsvpn(["exec", "--via", url, "--", "true"], home)
    assert r.returncode == 2, r.stderr
    line = one_line_error(r)
    assert line.startswith("nsvpn: ")
    for w in words:
        assert w in line, line


def test_bad_url_never_shows_the_password(home):
    r = nsvpn(["exec", "--via", "socks5://alice:t0psecret@h:port", "--", "true"], home)
    assert r.returncode == 2
    line = one_line_error(r)
    assert "t0psecret" not in line and "bad port" in line and "alice" in line


def test_bad_direct_cidr(home):
    r = nsvpn(["exec", "--via", "socks5://127.0.0.1:1", "--no-direct", "--direct",
               "10.0.0.0/33", "--", "true"], home)
    assert r.returncode == 2
    assert "10.0.0.0/33" in one_line_error(r)


# ------------------------------------------------------------------------- config file


def test_config_via_is_used(home):
    write_config(home, 'via = "socks5://from-config-file:99999"\n')
    r = nsvpn(["exec", "--", "true"], home)
    assert r.returncode == 2
    assert "from-config-file" in one_line_error(r)


def test_config_via_list(home):
    write_config(home, 'via = ["socks5://127.0.0.1:1080", "ftp://second-in-list"]\n')
    r = nsvpn(["exec", "--", "true"], home)
    assert r.returncode == 2
    assert "second-in-list" in one_line_error(r)


def test_precedence_cli_over_env_over_file(home):
    write_config(home, 'via = "socks5://from-file:99999"\n')
    env = {"NSVPN_VIA": "socks5://from-env:99999"}
    r = nsvpn(["exec", "--", "true"], home, env=env)
    assert "from-env" in one_line_error(r) and r.returncode == 2
    r = nsvpn(["exec", "--via", "socks5://from-cli:99999", "--", "true"], home, env=env)
    assert "from-cli" in one_line_error(r) and r.returncode == 2


def test_nsvpn_via_is_split_on_commas_and_spaces(home):
    r = nsvpn(["exec", "--", "true"], home,
              env={"NSVPN_VIA": "socks5://127.0.0.1:1080, ftp://second"})
    assert r.returncode == 2
    assert "ftp://second" in one_line_error(r)


def test_explicit_config_file(home, tmp_path):
    cfg = tmp_path / "site.toml"
    cfg.write_text('via = "socks5://from-explicit:99999"\n')
    write_config(home, 'via = "socks5://from-default:99999"\n')
    r = nsvpn(["exec", "--config", str(cfg), "--", "true"], home)
    assert "from-explicit" in one_line_error(r) and r.returncode == 2


@pytest.mark.parametrize("text,words", [
    (None, ["does not exist"]),
    ("via = [", ["not valid TOML"]),
    ("via = 5\n", ["'via' must be a string or a list of strings"]),
])
def test_config_file_errors(home, tmp_path, text, words):
    cfg = tmp_path / "bad.toml"
    if text is not None:
        cfg.write_text(text)
    r = nsvpn(["exec", "--config", str(cfg), "--", "true"], home)
    assert r.returncode == 2
    line = one_line_error(r)
    assert str(cfg) in line
    for w in words:
        assert w in line


def test_config_upstream_that_does_not_answer_exits_3(home, tmp_path):
    """A loopback listener that closes every connection is no SOCKS5 server: the upstream
    check fails (exit 3, naming it) and CMD never runs. Needs user namespaces (mode
    selection comes first), which the lab machine has."""
    marker = tmp_path / "ran"
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]

    def close_all() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.close()

    t = threading.Thread(target=close_all, daemon=True)
    t.start()
    try:
        write_config(home, f'via = "socks5://127.0.0.1:{port}"\n')
        t0 = time.monotonic()
        r = nsvpn(["exec", "--", "touch", str(marker)], home)
        secs = time.monotonic() - t0
    finally:
        srv.shutdown(socket.SHUT_RDWR)
        srv.close()
    if r.returncode == 4:
        pytest.skip(f"namespace mode unusable here: {r.stderr.strip()}")
    assert r.returncode == 3, r.stderr
    assert f"127.0.0.1:{port}" in one_line_error(r)
    assert not marker.exists()
    assert secs < 4.0  # a closed connection is an answer: no waiting for the 5 s bound


# ------------------------------------------------------------------------- probe


def test_probe_json_schema(home):
    secret = "pr0besecret"
    dead = closed_loopback_port()
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        live = srv.getsockname()[1]
        r = nsvpn(["probe", "--json", "--via", f"socks5://u:{secret}@127.0.0.1:{dead}",
                   "--via", f"ssh://127.0.0.1:{live}", "--via", "gopher://x"], home, timeout=60)
    assert secret not in r.stdout + r.stderr
    d = json.loads(r.stdout)
    # schema 1 may grow keys (e.g. "commands" for probe --check); these must stay
    assert {"schema", "mode", "reasons", "checks", "via", "elapsed_ms"} <= set(d)
    assert d["schema"] == 1
    assert d["mode"] in ("ns", "preload", "none")
    assert r.returncode == (1 if d["mode"] == "none" else 0)
    assert d["reasons"] and all(isinstance(x, str) and x for x in d["reasons"])
    assert isinstance(d["elapsed_ms"], (int, float)) and d["elapsed_ms"] >= 0
    for name in ("userns", "tun", "mount", "preload", "ssh", "openconnect"):
        c = d["checks"][name]
        assert {"ok", "detail", "data"} <= set(c), name
        assert isinstance(c["ok"], bool) and isinstance(c["detail"], str)
        assert isinstance(c["data"], dict)
    if d["mode"] == "ns":
        assert all(d["checks"][k]["ok"] for k in ("userns", "tun", "mount"))
    assert len(d["via"]) == 3 and all({"url", "ok", "detail"} <= set(v) for v in d["via"])
    closed, opened, bad = d["via"]
    assert closed["ok"] is False and f"127.0.0.1:{dead}" in closed["detail"]
    assert closed["url"] == f"socks5://u:***@127.0.0.1:{dead}"
    assert opened["ok"] is True and f"127.0.0.1:{live}" in opened["detail"]
    assert bad["ok"] is False and "gopher" in bad["detail"]


def test_probe_table(home):
    r = nsvpn(["probe"], home, timeout=60)
    assert r.returncode in (0, 1)
    lines = r.stdout.splitlines()
    names = {ln.split()[0] for ln in lines if ln.strip() and not ln.startswith(" ")}
    assert {"userns", "tun", "mount", "preload", "ssh", "openconnect", "mode"} <= names


def test_upstream_policy_reaches_the_pool():
    from nsvpn.cli import _build_parser
    from nsvpn.run import build_upstreams

    args = _build_parser().parse_args(
        ["exec", "--upstream-policy", "round-robin", "--via", "socks5://127.0.0.1:1",
         "--via", "socks5://127.0.0.1:2", "--", "true"])
    pool = build_upstreams(args.via, args)
    assert pool.policy == "round-robin" and len(pool.upstreams) == 2
    args = _build_parser().parse_args(["exec", "--via", "socks5://127.0.0.1:1", "--", "true"])
    assert build_upstreams(args.via, args).policy == "first"
