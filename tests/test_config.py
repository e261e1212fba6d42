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
        "ssh_opts": [], "mode": "auto", "upstream_policy": "first", "tsocks_conf": None,
        "allow_host_loopback": False, "no_proxy_env": False, "oc_opts": [],
        "passwd_file": None}
    assert set(sources(e).values()) == {"default"}


def test_top_level_file_values(tmp_path):
    e = eff(tmp_path, [], {})
    path = str(tmp_path / "config.toml")
    assert e.values["via"].value == ["ssh://file-a", "ssh://file-b"]
    assert e.values["no_direct"].value is True
    assert e.values["ssh_opts"].value == ["ConnectTimeout=5"]
    in_file = ("via", "direct", "no_direct", "dns_server", "ssh_opts", "mode")
    assert {sources(e)[k] for k in in_file} == {path}
    assert {sources(e)[k] for k in cfg.KEYS if k not in in_file} == {"default"}


def test_env_beats_file_and_cli_beats_env(tmp_path):
    env = {"NSVPN_VIA": "socks5://e:1, socks5://e:2", "NSVPN_DIRECT": "10.2.0.0/16 10.3.0.0/16",
           "NSVPN_NO_DIRECT": "no", "NSVPN_DNS_SERVER": "10.0.0.99",
           "NSVPN_SSH_OPTS": "ProxyCommand ssh -W %h:%p gw,BatchMode=yes",
           "NSVPN_MODE": "preload"}
    e = eff(tmp_path, [], env)
    v = {k: s.value for k, s in e.values.items() if k in env_keys(env)}
    assert v == {"via": ["socks5://e:1", "socks5://e:2"],
                 "direct": ["10.2.0.0/16", "10.3.0.0/16"], "no_direct": False,
                 "dns_server": "10.0.0.99",
                 "ssh_opts": ["ProxyCommand ssh -W %h:%p gw", "BatchMode=yes"],
                 "mode": "preload"}
    assert {k: x for k, x in sources(e).items() if k in env_keys(env)} == {
                          "via": "NSVPN_VIA", "direct": "NSVPN_DIRECT",
                          "no_direct": "NSVPN_NO_DIRECT", "dns_server": "NSVPN_DNS_SERVER",
                          "ssh_opts": "NSVPN_SSH_OPTS", "mode": "NSVPN_MODE"}
    e = eff(tmp_path, ["--via", "ssh://cli", "--direct", "192.168.0.0/24", "--no-direct",
                       "--dns-server", "1.2.3.4", "--ssh-opt", "Port=22", "--mode", "ns"], env)
    v = {k: s.value for k, s in e.values.items() if k in env_keys(env)}
    assert v == {"via": ["ssh://cli"], "direct": ["192.168.0.0/24"], "no_direct": True,
                 "dns_server": "1.2.3.4", "ssh_opts": ["Port=22"], "mode": "ns"}
    assert {sources(e)[k] for k in env_keys(env)} == {"command line"}


def env_keys(env: Dict[str, str]) -> List[str]:
    """The config keys these NSVPN_* variables set."""
    return [k for k, (_kind, var, _d) in cfg.KEYS.items() if var in env]


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
    w = max(len(k) for k in cfg.KEYS)
    assert lines[0] == f"{'config file:':<{w}} {other}"
    assert f"{'via':<{w}} socks5://127.0.0.1:1080  [{other}]" in lines
    assert f"{'mode':<{w}} auto  [default]" in lines
    assert f"{'upstream_policy':<{w}} first  [default]" in lines


def test_config_show_takes_exec_settings(home, tmp_path):
    """An exec command line's settings can be checked as they are: exec-only flags that are
    config keys are accepted by `config show` and shown with their source."""
    ts = write(tmp_path, "server = 127.0.0.1\nserver_port = 1080\n", "tsocks.conf")
    r = nsvpn(["config", "show", "--json", "--tsocks-conf", str(ts), "--no-proxy-env",
               "--allow-host-loopback", "--oc-opt=--servercert=pin-sha256:x",
               "--passwd-file", "/nonexistent"], home)
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)["settings"]
    for key, want in (("tsocks_conf", str(ts)), ("no_proxy_env", True),
                      ("allow_host_loopback", True), ("oc_opts", ["--servercert=pin-sha256:x"]),
                      ("passwd_file", "/nonexistent")):
        assert v[key]["value"] == want and v[key]["source"] == "command line", (key, v[key])


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


# ------------------------------------------------------------------------- issue 7's other keys
# (upstream policy, tsocks.conf import, host loopback, proxy env, openconnect options): every
# exec option a site would keep in a profile, with the same precedence.

def parse_exec(argv: List[str]) -> argparse.Namespace:
    """The real `nsvpn exec` parser (it has the options add_config_args does not define)."""
    from nsvpn.cli import _build_parser

    return _build_parser().parse_args(["exec", *argv, "--", "true"])


def exec_eff(tmp_path: Path, argv: List[str], env: Dict[str, str], text: str):
    e = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    e.update(env)
    return cfg.effective(parse_exec(["--config", str(write(tmp_path, text))] + argv), e)


POLICY_FILE = """
via = ["socks5://a:1", "socks5://b:1"]
upstream_policy = "round-robin"
[profile.p]
upstream_policy = "first"
[profile.q]
"""


def test_upstream_policy_through_all_five_levels(tmp_path):
    path = str(tmp_path / "config.toml")
    e = exec_eff(tmp_path, [], {}, 'via = "ssh://x"\n')
    assert (e.values["upstream_policy"].value, e.values["upstream_policy"].source) == \
        ("first", "default")
    e = exec_eff(tmp_path, [], {}, POLICY_FILE)
    assert (e.values["upstream_policy"].value, e.values["upstream_policy"].source) == \
        ("round-robin", path)
    e = exec_eff(tmp_path, ["--profile", "p"], {}, POLICY_FILE)
    assert (e.values["upstream_policy"].value, e.values["upstream_policy"].source) == \
        ("first", f"{path} [profile.p]")
    e = exec_eff(tmp_path, ["--profile", "p"], {"NSVPN_UPSTREAM_POLICY": "round-robin"},
                 POLICY_FILE)
    assert (e.values["upstream_policy"].value, e.values["upstream_policy"].source) == \
        ("round-robin", "NSVPN_UPSTREAM_POLICY")
    e = exec_eff(tmp_path, ["--profile", "p", "--upstream-policy", "first"],
                 {"NSVPN_UPSTREAM_POLICY": "round-robin"}, POLICY_FILE)
    assert (e.values["upstream_policy"].value, e.values["upstream_policy"].source) == \
        ("first", "command line")


def test_upstream_policy_reaches_the_upstream_pool(tmp_path):
    """apply_to_args writes the policy where exec builds its pool from."""
    from nsvpn.run import build_upstreams

    args = parse_exec(["--config", str(write(tmp_path, POLICY_FILE))])
    cfg.apply_to_args(args, {})
    assert args.upstream_policy == "round-robin"
    pool = build_upstreams(args.via, args)
    assert pool.policy == "round-robin"
    args = parse_exec(["--config", str(write(tmp_path, 'via = ["socks5://a:1"]\n', "b.toml"))])
    cfg.apply_to_args(args, {})
    assert build_upstreams(args.via, args).policy == "first"


@pytest.mark.parametrize("key,flag,var", [
    ("allow_host_loopback", "--allow-host-loopback", "NSVPN_ALLOW_HOST_LOOPBACK"),
    ("no_proxy_env", "--no-proxy-env", "NSVPN_NO_PROXY_ENV"),
])
def test_store_true_flags_from_file_env_and_cli(tmp_path, key, flag, var):
    path = str(tmp_path / "config.toml")
    text = f'via = "ssh://x"\n{key} = true\n[profile.off]\n{key} = false\n'
    e = exec_eff(tmp_path, [], {}, text)  # the flag absent on the command line is not "false"
    assert (e.values[key].value, e.values[key].source) == (True, path)
    e = exec_eff(tmp_path, ["--profile", "off"], {}, text)
    assert (e.values[key].value, e.values[key].source) == (False, f"{path} [profile.off]")
    e = exec_eff(tmp_path, ["--profile", "off"], {var: "yes"}, text)
    assert (e.values[key].value, e.values[key].source) == (True, var)
    e = exec_eff(tmp_path, ["--profile", "off", flag], {var: "0"}, text)
    assert (e.values[key].value, e.values[key].source) == (True, "command line")
    args = parse_exec(["--config", str(write(tmp_path, text, "c.toml"))])
    cfg.apply_to_args(args, {})
    assert getattr(args, key) is True


def test_openconnect_options_and_password_file(tmp_path):
    text = ('via = "openconnect://vpn.example"\n'
            'oc_opts = ["--servercert=pin-sha256:AAAA", "--usergroup=x y"]\n'
            'passwd_file = "~/vpnpass"\n')
    home = os.path.expanduser("~")
    args = parse_exec(["--config", str(write(tmp_path, text))])
    cfg.apply_to_args(args, {})
    assert args.oc_opt == ["--servercert=pin-sha256:AAAA", "--usergroup=x y"]
    assert args.passwd_file == os.path.join(home, "vpnpass")
    e = exec_eff(tmp_path, [], {"NSVPN_OC_OPTS": "--no-dtls,--usergroup=a b"}, text)
    assert e.values["oc_opts"].value == ["--no-dtls", "--usergroup=a b"]
    # --passwd-fd on the command line: the file's passwd_file must not be used as well
    args = parse_exec(["--config", str(write(tmp_path, text, "b.toml")), "--passwd-fd", "7"])
    cfg.apply_to_args(args, {})
    assert args.passwd_fd == 7 and args.passwd_file is None
    args = parse_exec(["--config", str(write(tmp_path, text, "c.toml")),
                       "--passwd-file", "/p"])
    cfg.apply_to_args(args, {})
    assert args.passwd_file == "/p"


TSOCKS = "server = 192.0.2.7\nserver_port = 1081\nlocal = 10.9.0.0/255.255.0.0\n"


def test_tsocks_conf_server_is_the_upstream_at_its_own_level(tmp_path):
    ts = write(tmp_path, TSOCKS, "tsocks.conf")
    path = str(tmp_path / "config.toml")
    # only a tsocks_conf in the file: its server is the upstream
    e = exec_eff(tmp_path, [], {}, f'tsocks_conf = "{ts}"\n')
    assert e.values["tsocks_conf"].value == str(ts)
    assert e.values["via"].value == ["socks5://192.0.2.7:1081"]
    assert e.values["via"].source == f"{path} (tsocks.conf server)"
    # a via at the same level wins
    e = exec_eff(tmp_path, [], {}, f'tsocks_conf = "{ts}"\nvia = "ssh://login"\n')
    assert e.values["via"].value == ["ssh://login"]
    # a profile's tsocks_conf beats the top-level via; $NSVPN_VIA beats both
    text = f'via = "ssh://login"\n[profile.site]\ntsocks_conf = "{ts}"\n'
    e = exec_eff(tmp_path, ["--profile", "site"], {}, text)
    assert e.values["via"].value == ["socks5://192.0.2.7:1081"]
    e = exec_eff(tmp_path, ["--profile", "site"], {"NSVPN_VIA": "ssh://env"}, text)
    assert e.values["via"].value == ["ssh://env"]
    # --tsocks-conf beats $NSVPN_VIA (as before: "unless --via names one")
    e = exec_eff(tmp_path, ["--tsocks-conf", str(ts)], {"NSVPN_VIA": "ssh://env"}, "")
    assert e.values["via"].value == ["socks5://192.0.2.7:1081"]
    assert e.values["via"].source == "command line (tsocks.conf server)"
    e = exec_eff(tmp_path, ["--tsocks-conf", str(ts), "--via", "ssh://cli"], {}, "")
    assert e.values["via"].value == ["ssh://cli"]
    # from the environment, and written back for exec
    args = parse_exec(["--config", str(write(tmp_path, "", "empty.toml"))])
    cfg.apply_to_args(args, {"NSVPN_TSOCKS_CONF": str(ts)})
    assert args.tsocks_conf == str(ts) and args.via == ["socks5://192.0.2.7:1081"]


def test_tsocks_conf_errors_name_the_source(tmp_path):
    path = str(tmp_path / "config.toml")
    with pytest.raises(cfg.ConfigError) as ei:
        exec_eff(tmp_path, [], {}, f'tsocks_conf = "{tmp_path}/nope.conf"\n')
    assert "nope.conf" in str(ei.value) and path in str(ei.value)
    bad = write(tmp_path, "server = 192.0.2.7\nserver_type = 4\n", "t4.conf")
    with pytest.raises(cfg.ConfigError, match="SOCKS4"):
        exec_eff(tmp_path, [], {}, f'tsocks_conf = "{bad}"\n')


@pytest.mark.parametrize("text,fragment", [
    ('upstream_policy = "random"\n', "'upstream_policy' must be one of first, round-robin"),
    ('allow_host_loopback = "yes"\n', "'allow_host_loopback' must be true or false"),
    ("tsocks_conf = 1\n", "'tsocks_conf' must be a string"),
    ('oc_opts = [1]\n', "'oc_opts' must be a string or a list"),
])
def test_bad_values_of_the_new_keys(tmp_path, text, fragment):
    with pytest.raises(cfg.ConfigError) as ei:
        eff(tmp_path, [], {}, text=text)
    assert fragment in str(ei.value) and str(tmp_path / "config.toml") in str(ei.value)
    with pytest.raises(cfg.ConfigError, match="NSVPN_UPSTREAM_POLICY"):
        eff(tmp_path, [], {"NSVPN_UPSTREAM_POLICY": "random"})


def test_config_show_new_keys_and_no_passwords(home, tmp_path):
    ts = write(tmp_path, "server = 192.0.2.7\ndefault_user = u\ndefault_pass = s3cret\n",
               "tsocks.conf")
    path = str(home / ".config" / "nsvpn" / "config.toml")
    (home / ".config" / "nsvpn" / "config.toml").write_text(
        f'tsocks_conf = "{ts}"\nallow_host_loopback = true\n')
    r = nsvpn(["config", "show", "--json", "--upstream-policy", "round-robin"], home,
              env={"NSVPN_NO_PROXY_ENV": "1"})
    assert r.returncode == 0, r.stderr
    assert "s3cret" not in r.stdout
    s = json.loads(r.stdout)["settings"]
    assert s["via"] == {"value": ["socks5://u:***@192.0.2.7:1080"],
                        "source": f"{path} (tsocks.conf server)"}
    assert s["upstream_policy"] == {"value": "round-robin", "source": "command line"}
    assert s["allow_host_loopback"] == {"value": True, "source": path}
    assert s["no_proxy_env"] == {"value": True, "source": "NSVPN_NO_PROXY_ENV"}
    assert s["tsocks_conf"] == {"value": str(ts), "source": path}
