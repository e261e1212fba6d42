"""Configuration: precedence (CLI > NSVPN_* > [profile.NAME] > top-level file > default),
profiles, errors naming the key and the file, `nsvpn config show [--json]`, and `nsvpn exec`
using the same resolution. No privileges, no network.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from nsvpn import config as cfg

REPO = Path(__file__).resolve().parent.parent

FILE = """
via = ["ssh://file-a", "ssh://file-b"]
direct = ["10.1.0.0/16"]
no_direct = true
dns_server = "10.0.0.53"
ssh_opts = ["ConnectTimeout=5"]
mode = "ns"

[profile.cern]
via = "ssh://lxplus"
mode = "preload"

[profile.empty]
"""


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def parse(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cfg.add_config_args(p)
    return p.parse_args(argv)


def eff(tmp_path: Path, argv: List[str], env: Dict[str, str], text: Optional[str] = FILE):
    e = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    e.update(env)
    if text is not None:
        argv = ["--config", str(write(tmp_path, text))] + argv
    return cfg.effective(parse(argv), e)


def sources(e) -> Dict[str, str]:
    return {k: s.source for k, s in e.values.items()}


# ------------------------------------------------------------------------- precedence


def test_defaults_without_any_file(tmp_path):
    e = eff(tmp_path, [], {}, text=None)
    assert e.file.path is None
    assert {k: s.value for k, s in e.values.items()} == {
        "via": None, "direct": [], "no_direct": False, "dns_server": None,
        "ssh_opts": [], "mode": "auto"}
    assert set(sources(e).values()) == {"default"}


def test_top_level_file_values(tmp_path):
    e = eff(tmp_path, [], {})
    path = str(tmp_path / "config.toml")
    assert e.values["via"].value == ["ssh://file-a", "ssh://file-b"]
    assert e.values["no_direct"].value is True
    assert e.values["ssh_opts"].value == ["ConnectTimeout=5"]
    assert set(sources(e).values()) == {path}


def test_env_beats_file_and_cli_beats_env(tmp_path):
    env = {"NSVPN_VIA": "socks5://e:1, socks5://e:2", "NSVPN_DIRECT": "10.2.0.0/16 10.3.0.0/16",
           "NSVPN_NO_DIRECT": "no", "NSVPN_DNS_SERVER": "10.0.0.99",
           "NSVPN_SSH_OPTS": "ProxyCommand ssh -W %h:%p gw,BatchMode=yes",
           "NSVPN_MODE": "preload"}
    e = eff(tmp_path, [], env)
    v = {k: s.value for k, s in e.values.items()}
    assert v == {"via": ["socks5://e:1", "socks5://e:2"],
                 "direct": ["10.2.0.0/16", "10.3.0.0/16"], "no_direct": False,
                 "dns_server": "10.0.0.99",
                 "ssh_opts": ["ProxyCommand ssh -W %h:%p gw", "BatchMode=yes"],
                 "mode": "preload"}
    assert sources(e) == {"via": "NSVPN_VIA", "direct": "NSVPN_DIRECT",
                          "no_direct": "NSVPN_NO_DIRECT", "dns_server": "NSVPN_DNS_SERVER",
                          "ssh_opts": "NSVPN_SSH_OPTS", "mode": "NSVPN_MODE"}
    e = eff(tmp_path, ["--via", "ssh://cli", "--direct", "192.168.0.0/24", "--no-direct",
                       "--dns-server", "1.2.3.4", "--ssh-opt", "Port=22", "--mode", "ns"], env)
    v = {k: s.value for k, s in e.values.items()}
    assert v == {"via": ["ssh://cli"], "direct": ["192.168.0.0/24"], "no_direct": True,
                 "dns_server": "1.2.3.4", "ssh_opts": ["Port=22"], "mode": "ns"}
    assert set(sources(e).values()) == {"command line"}


def test_blank_env_counts_as_unset(tmp_path):
    e = eff(tmp_path, [], {"NSVPN_VIA": " , ", "NSVPN_MODE": ""})
    assert e.values["via"].source == str(tmp_path / "config.toml")
    assert e.values["mode"].value == "ns"


# ------------------------------------------------------------------------- profiles


def test_profile_beats_top_level_but_not_env(tmp_path):
    path = str(tmp_path / "config.toml")
    e = eff(tmp_path, ["--profile", "cern"], {})
    assert e.profile.value == "cern" and e.profile.source == "command line"
    assert e.values["via"].value == ["ssh://lxplus"]
    assert e.values["via"].source == f"{path} [profile.cern]"
    assert e.values["mode"].value == "preload"
    assert e.values["dns_server"].source == path  # not in the profile: top level
    e = eff(tmp_path, ["--profile", "cern"], {"NSVPN_MODE": "auto"})
    assert e.values["mode"].value == "auto" and e.values["mode"].source == "NSVPN_MODE"


def test_profile_from_env_and_cli_overrides_it(tmp_path):
    e = eff(tmp_path, [], {"NSVPN_PROFILE": "cern"})
    assert e.profile.source == "NSVPN_PROFILE"
    assert e.values["via"].value == ["ssh://lxplus"]
    e = eff(tmp_path, ["--profile", "empty"], {"NSVPN_PROFILE": "cern"})
    assert e.values["via"].value == ["ssh://file-a", "ssh://file-b"]


def test_unknown_profile_names_profile_and_file(tmp_path):
    with pytest.raises(cfg.ConfigError) as ei:
        eff(tmp_path, ["--profile", "nope"], {})
    msg = str(ei.value)
    assert "'nope'" in msg and str(tmp_path / "config.toml") in msg
    assert "cern" in msg and "empty" in msg  # what exists


# ------------------------------------------------------------------------- errors


@pytest.mark.parametrize("text,key,where", [
    ('vai = "ssh://x"\n', "vai", ""),
    ('via = "ssh://x"\n[profile.a]\ndns = "1.1.1.1"\n', "dns", "[profile.a]"),
])
def test_unknown_key_names_key_and_file(tmp_path, text, key, where):
    with pytest.raises(cfg.ConfigError) as ei:
        eff(tmp_path, [], {}, text=text)
    msg = str(ei.value)
    assert f"unknown key '{key}'" in msg
    assert str(tmp_path / "config.toml") in msg and where in msg


@pytest.mark.parametrize("text,fragment", [
    ("via = 3\n", "'via' must be a string or a list of strings"),
    ('no_direct = "yes"\n', "'no_direct' must be true or false"),
    ('mode = "fast"\n', "'mode' must be one of auto, ns, preload"),
    ("dns_server = [1]\n", "'dns_server' must be a string"),
    ("direct = [1, 2]\n", "'direct' must be a string or a list"),
    ('profile = "x"\n', "'profile' must be a table"),
    ("via = [\n", "is not valid TOML"),
])
def test_bad_values(tmp_path, text, fragment):
    with pytest.raises(cfg.ConfigError) as ei:
        eff(tmp_path, [], {}, text=text)
    assert fragment in str(ei.value)
    assert str(tmp_path / "config.toml") in str(ei.value)


def test_bad_env_values(tmp_path):
    with pytest.raises(cfg.ConfigError, match="NSVPN_NO_DIRECT"):
        eff(tmp_path, [], {"NSVPN_NO_DIRECT": "maybe"})
    with pytest.raises(cfg.ConfigError, match="NSVPN_MODE"):
        eff(tmp_path, [], {"NSVPN_MODE": "fast"})


def test_explicit_missing_file_is_an_error_default_missing_is_not(tmp_path):
    with pytest.raises(cfg.ConfigError, match="does not exist"):
        cfg.effective(parse(["--config", str(tmp_path / "nope.toml")]), {})
    e = cfg.effective(parse([]), {"XDG_CONFIG_HOME": str(tmp_path / "none")})
    assert e.file.path is None


def test_xdg_config_home_is_honoured(tmp_path):
    d = tmp_path / "xdg" / "nsvpn"
    d.mkdir(parents=True)
    (d / "config.toml").write_text('via = "ssh://xdg"\n')
    e = cfg.effective(parse([]), {"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    assert e.values["via"].value == ["ssh://xdg"]
    assert e.values["via"].source == str(d / "config.toml")


def test_apply_to_args_writes_back_and_requires_via(tmp_path):
    args = parse(["--config", str(write(tmp_path, FILE)), "--ssh-opt", "Port=2"])
    cfg.apply_to_args(args, {})
    assert args.via == ["ssh://file-a", "ssh://file-b"]
    assert args.ssh_opt == ["Port=2"] and args.no_direct is True
    assert args.mode == "ns" and args.dns_server == "10.0.0.53"
    args = parse(["--config", str(write(tmp_path, "mode = 'ns'\n", "b.toml"))])
    with pytest.raises(cfg.ConfigError, match="no upstream given"):
        cfg.apply_to_args(args, {})


# ------------------------------------------------------------------------- the command


def nsvpn(args: List[str], home: Path, env: Optional[Dict[str, str]] = None):
    e = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
         "XDG_CONFIG_HOME": str(home / ".config"), "LANG": "C.UTF-8",
         "PYTHONPATH": str(REPO)}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "nsvpn", *args], env=e, cwd=str(home),
                          capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    (h / ".config" / "nsvpn").mkdir(parents=True)
    (h / ".config" / "nsvpn" / "config.toml").write_text(FILE)
    return h


def test_config_show_json_sources(home):
    path = str(home / ".config" / "nsvpn" / "config.toml")
    r = nsvpn(["config", "show", "--json", "--profile", "cern", "--dns-server", "9.9.9.9"],
              home, env={"NSVPN_DIRECT": "10.7.0.0/16"})
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["schema"] == 1 and d["config_file"] == path
    assert d["profile"] == {"value": "cern", "source": "command line"}
    s = d["settings"]
    assert s["dns_server"] == {"value": "9.9.9.9", "source": "command line"}
    assert s["direct"] == {"value": ["10.7.0.0/16"], "source": "NSVPN_DIRECT"}
    assert s["via"] == {"value": ["ssh://lxplus"], "source": f"{path} [profile.cern]"}
    assert s["ssh_opts"] == {"value": ["ConnectTimeout=5"], "source": path}
    assert s["mode"]["source"] == f"{path} [profile.cern]"


def test_config_show_text_and_explicit_file(home, tmp_path):
    other = write(tmp_path, 'via = "socks5://127.0.0.1:1080"\n', "other.toml")
    r = nsvpn(["config", "show", "--config", str(other)], home)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"config file: {other}"
    assert f"via         socks5://127.0.0.1:1080  [{other}]" in lines
    assert "mode        auto  [default]" in lines


def test_config_show_error_is_one_line(home):
    (home / ".config" / "nsvpn" / "config.toml").write_text('via = "x"\nviaa = "y"\n')
    r = nsvpn(["config", "show"], home)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown key 'viaa'" in lines[0]
    assert str(home / ".config" / "nsvpn" / "config.toml") in lines[0]


def test_exec_refuses_unknown_key_before_running_cmd(home, tmp_path):
    (home / ".config" / "nsvpn" / "config.toml").write_text('via = "ssh://x"\nmdoe = "ns"\n')
    marker = tmp_path / "ran"
    r = nsvpn(["exec", "--", "touch", str(marker)], home)
    assert r.returncode == 2
    assert "unknown key 'mdoe'" in r.stderr
    assert not marker.exists()


def test_exec_takes_direct_from_the_profile(home, tmp_path):
    """A bad CIDR that only the profile holds proves exec resolves `direct` from it."""
    (home / ".config" / "nsvpn" / "config.toml").write_text(
        'via = "socks5://127.0.0.1:9"\n[profile.bad]\ndirect = ["10.0.0.0/33"]\n')
    marker = tmp_path / "ran"
    r = nsvpn(["exec", "--", "touch", str(marker)], home, env={"NSVPN_PROFILE": "bad"})
    assert r.returncode == 2, r.stderr
    assert "10.0.0.0/33" in r.stderr
    assert not marker.exists()
    r = nsvpn(["exec", "--direct", "10.0.0.0/8", "--", "true"], home,
              env={"NSVPN_PROFILE": "bad", "NSVPN_VIA": "bad://"})
    assert "10.0.0.0/33" not in r.stderr  # the command line replaced the profile's list


def test_exec_logs_effective_config_to_log_file(home, tmp_path):
    """-vv --log-file: exec's resolved values and their sources, timestamped, in the file;
    nothing of it on stderr."""
    path = str(home / ".config" / "nsvpn" / "config.toml")
    log = tmp_path / "nsvpn.log"
    r = nsvpn(["exec", "-vv", "--log-file", str(log), "--profile", "cern",
               "--via", "socks5://127.0.0.1:9", "--", "true"], home,
              env={"NSVPN_DNS_SERVER": "10.9.9.9"})
    text = log.read_text()
    assert "config via = ['socks5://127.0.0.1:9'] (command line)" in text
    assert "config dns_server = '10.9.9.9' (NSVPN_DNS_SERVER)" in text
    assert f"config mode = 'preload' ({path} [profile.cern])" in text
    assert f"config ssh_opts = ['ConnectTimeout=5'] ({path})" in text
    first = text.splitlines()[0]
    assert first[:4].isdigit() and first[4] == "-" and " nsvpn DEBUG " in first  # timestamp
    assert "config via" not in r.stderr
