"""Where settings come from: command line, environment, ~/.config/nsvpn/config.toml.

Precedence is CLI > NSVPN_* environment > [profile.NAME] table > top-level file keys >
built-in default. Every resolved value remembers its source so `nsvpn config show` and error
messages can say where a value came from.

The file (XDG_CONFIG_HOME honoured; `--config FILE` overrides the path):

    via = ["ssh://login1", "ssh://login2"]   # or a single string
    direct = ["10.20.0.0/16"]
    no_direct = false
    dns_server = "10.0.0.53"
    ssh_opts = ["ConnectTimeout=5"]
    mode = "auto"                            # auto | ns | preload
    upstream_policy = "first"                # first | round-robin (several via)
    tsocks_conf = "/etc/tsocks.conf"         # its server, local nets and path sections
    allow_host_loopback = false
    no_proxy_env = false                     # preload mode: no ALL_PROXY/http(s)_proxy
    oc_opts = ["--servercert=pin-sha256:..."]  # openconnect options
    passwd_file = "~/.vpnpass"               # openconnect password (first line)

    [profile.cern]                           # selected by --profile cern / NSVPN_PROFILE
    via = "ssh://lxplus.cern.ch"
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 only
    import tomli as tomllib


class ConfigError(Exception):
    """A configuration problem the user must fix; the message is shown as is."""


def default_config_path(env: Optional[Mapping[str, str]] = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "nsvpn" / "config.toml"


@dataclass
class Sourced:
    value: Any
    source: str  # "command line", "NSVPN_VIA", "/path/config.toml", "/path [profile.x]", "default"
    level: int = 4  # which of LEVELS it came from (lower wins)


LEVELS = ("command line", "environment", "profile", "file", "default")


@dataclass
class FileConfig:
    path: Optional[Path]
    data: Dict[str, Any] = field(default_factory=dict)


MODES = ("auto", "ns", "preload")
POLICIES = ("first", "round-robin")
# key -> (kind, NSVPN_* variable, default). Kinds: "list" (string or list of strings in the
# file; space/comma separated in the environment), "str", "path" (a string; ~ is expanded),
# "bool".
KEYS: Dict[str, tuple] = {
    "via": ("list", "NSVPN_VIA", None),
    "direct": ("list", "NSVPN_DIRECT", []),
    "no_direct": ("bool", "NSVPN_NO_DIRECT", False),
    "dns_server": ("str", "NSVPN_DNS_SERVER", None),
    "ssh_opts": ("list", "NSVPN_SSH_OPTS", []),
    "mode": ("str", "NSVPN_MODE", "auto"),
    "upstream_policy": ("str", "NSVPN_UPSTREAM_POLICY", "first"),
    "tsocks_conf": ("path", "NSVPN_TSOCKS_CONF", None),
    "allow_host_loopback": ("bool", "NSVPN_ALLOW_HOST_LOOPBACK", False),
    "no_proxy_env": ("bool", "NSVPN_NO_PROXY_ENV", False),
    "oc_opts": ("list", "NSVPN_OC_OPTS", []),
    "passwd_file": ("path", "NSVPN_PASSWD_FILE", None),
}
# Values that are lists in the environment but whose items may hold spaces: comma separated.
_COMMA_LISTS = ("ssh_opts", "oc_opts")
# Choices of "str" keys.
_CHOICES = {"mode": MODES, "upstream_policy": POLICIES}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def load_file(path: Optional[Path] = None, *, explicit: bool = False,
              env: Optional[Mapping[str, str]] = None) -> FileConfig:
    """Read and check the TOML config. A missing default file is fine; a missing --config
    file is not. Unknown keys are errors (a typo must not be silently ignored)."""
    p = path or default_config_path(env)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {p} does not exist") from None
        return FileConfig(None)
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    _check_table(data, p, None)
    profiles = data.get("profile", {})
    if not isinstance(profiles, dict):
        raise ConfigError(f"{p}: 'profile' must be a table of [profile.NAME] tables")
    for name, table in profiles.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{p}: 'profile.{name}' must be a table")
        _check_table(table, p, name)
    return FileConfig(p, data)


def _check_table(table: Dict[str, Any], path: Path, profile: Optional[str]) -> None:
    where = f"{path}" + (f" [profile.{profile}]" if profile else "")
    for key, value in table.items():
        if key == "profile" and profile is None:
            continue
        if key not in KEYS:
            known = ", ".join(sorted(KEYS))
            raise ConfigError(f"{where}: unknown key '{key}' (known keys: {known}"
                              + (", [profile.NAME]" if profile is None else "") + ")")
        _check_value(key, value, where)


def _check_value(key: str, value: Any, where: str) -> Any:
    kind = KEYS[key][0]
    if kind == "list":
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{where}: '{key}' must be a string or a list of strings")
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: '{key}' must be true or false")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{where}: '{key}' must be a string")
    choices = _CHOICES.get(key)
    if choices and value not in choices:
        raise ConfigError(f"{where}: '{key}' must be one of {', '.join(choices)}, "
                          f"not {value!r}")
    if kind == "path":
        return os.path.expanduser(value)
    return value


def _from_env(key: str, text: str, var: str) -> Any:
    kind = KEYS[key][0]
    if kind == "list":
        if key in _COMMA_LISTS:  # an option may contain spaces ("ProxyCommand ssh -W ...")
            return [s.strip() for s in text.split(",") if s.strip()]
        return text.replace(",", " ").split()
    if kind == "bool":
        if text.strip().lower() in _TRUE:
            return True
        if text.strip().lower() in _FALSE:
            return False
        raise ConfigError(f"{var}={text!r}: expected 1/0, true/false, yes/no")
    return _check_value(key, text, var)


def select_profile(cli: Optional[str], env: Mapping[str, str]) -> Sourced:
    if cli:
        return Sourced(cli, "command line")
    if env.get("NSVPN_PROFILE"):
        return Sourced(env["NSVPN_PROFILE"], "NSVPN_PROFILE")
    return Sourced(None, "default")


def resolve(cli: Mapping[str, Any], env: Mapping[str, str], fc: FileConfig,
            profile: Optional[str] = None) -> Dict[str, Sourced]:
    """Every key of KEYS -> Sourced. `cli` holds only what was given on the command line
    (missing or None = not given). A profile that the file does not define is an error."""
    table: Dict[str, Any] = {}
    if profile:
        profiles = fc.data.get("profile", {})
        if profile not in profiles:
            where = str(fc.path) if fc.path else f"{default_config_path(env)} (absent)"
            have = ", ".join(sorted(profiles)) or "none"
            raise ConfigError(f"profile '{profile}' is not defined in {where} "
                              f"(profiles there: {have})")
        table = profiles[profile]
    out: Dict[str, Sourced] = {}
    for key, (_kind, var, default) in KEYS.items():
        v = cli.get(key)
        if v is not None and v != []:
            out[key] = Sourced(v, "command line", 0)
            continue
        text = env.get(var)
        if text is not None and text.strip():
            ev = _from_env(key, text, var)
            if ev != []:  # " , " names no upstream: as if unset
                out[key] = Sourced(ev, var, 1)
                continue
        if key in table:
            where = f"{fc.path} [profile.{profile}]"
            out[key] = Sourced(_check_value(key, table[key], where), where, 2)
            continue
        if fc.path is not None and key in fc.data:
            out[key] = Sourced(_check_value(key, fc.data[key], str(fc.path)), str(fc.path), 3)
            continue
        out[key] = Sourced(list(default) if isinstance(default, list) else default, "default")
    return out


def resolve_via(cli: List[str], env: Mapping[str, str], fc: FileConfig,
                profile: Optional[str] = None) -> Sourced:
    """The upstream list; ConfigError when no source gives one."""
    via = resolve({"via": cli}, env, fc, profile)["via"]
    if not via.value:
        raise ConfigError(
            "no upstream given: use --via URL, set NSVPN_VIA, or put via = \"ssh://host\" in "
            f"{default_config_path(env)}"
        )
    return via


_URL_PASSWORD = re.compile(r"(://[^/@:\s]*:)[^/@\s]*@")


def _redact(value: Any) -> Any:
    """socks5://user:PASS@host -> socks5://user:***@host: `config show` output gets pasted."""
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\1***@", value)
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


def show_dict(values: Mapping[str, Sourced], fc: FileConfig, profile: Sourced) -> dict:
    """`nsvpn config show --json` (schema 1). Passwords in URLs are shown as ***."""
    return {
        "schema": 1,
        "config_file": str(fc.path) if fc.path else None,
        "profile": {"value": profile.value, "source": profile.source},
        "settings": {k: {"value": _redact(s.value), "source": s.source}
                     for k, s in values.items()},
    }


def format_show(d: dict) -> str:
    w = max([len(k) for k in d["settings"]] + [12])
    lines = [f"{'config file:':<{w}} {d['config_file'] or '(none)'}"]
    prof = d["profile"]
    lines.append(f"{'profile:':<{w}} {prof['value'] or '(none)'}  [{prof['source']}]")
    for key, s in d["settings"].items():
        v = s["value"]
        if isinstance(v, list):
            text = " ".join(v) if v else "(empty)"
        elif v is None:
            text = "(unset)"
        elif isinstance(v, bool):
            text = "true" if v else "false"
        else:
            text = str(v)
        lines.append(f"{key:<{w}} {text}  [{s['source']}]")
    return "\n".join(lines)


# -- command line -------------------------------------------------------------------------------
# Defaults are None/empty so that "not given on the command line" is detectable: the real
# defaults live in KEYS and are applied by resolve().
def add_config_args(p) -> None:
    """The options `exec` and `config show` share (argparse parser `p`)."""
    p.add_argument("--via", action="append", default=[], metavar="URL",
                   help="upstream: ssh://[user@]host[:port], socks5://[user:pass@]host:port, "
                        "openconnect://[user@]host[:port]; "
                        "repeat for failover (default: $NSVPN_VIA or via= in the config file)")
    p.add_argument("--upstream-policy", choices=POLICIES, default=None,
                   help="with several --via: new flows go to the first healthy one (default) "
                        "or round-robin over the healthy ones; a dead one is skipped and "
                        "retried with backoff (or $NSVPN_UPSTREAM_POLICY / upstream_policy=)")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="force a mode (default: auto, or $NSVPN_MODE / mode= in the file)")
    p.add_argument("--config", metavar="FILE",
                   help="config file (default $XDG_CONFIG_HOME/nsvpn/config.toml, "
                        "i.e. ~/.config/nsvpn/config.toml)")
    p.add_argument("--profile", metavar="NAME",
                   help="use the [profile.NAME] table of the config file (or $NSVPN_PROFILE)")
    p.add_argument("--ssh-opt", action="append", default=[], metavar="OPT",
                   help="extra ssh option, passed as -o OPT (repeatable)")
    p.add_argument("--direct", action="append", default=[], metavar="CIDR",
                   help="also dial this network directly with host sockets (repeatable)")
    p.add_argument("--no-direct", action="store_true", default=None,
                   help="send everything through the upstream, even the host's own networks")
    p.add_argument("--dns-server", metavar="IP[:PORT]", default=None,
                   help="resolve names the host cannot by DNS-over-TCP to this server "
                        "through the upstream (default: fake IPs, resolved by the far side)")


def cli_values(args) -> Dict[str, Any]:
    """What the command line said, under the config keys (None/[] = not given)."""
    return {
        "via": list(getattr(args, "via", None) or []),
        "direct": list(getattr(args, "direct", None) or []),
        "no_direct": getattr(args, "no_direct", None),
        "dns_server": getattr(args, "dns_server", None),
        "ssh_opts": list(getattr(args, "ssh_opt", None) or []),
        "mode": getattr(args, "mode", None),
        "upstream_policy": getattr(args, "upstream_policy", None),
        "tsocks_conf": getattr(args, "tsocks_conf", None),
        # store_true flags: False means "not given", so a lower source may still say true
        "allow_host_loopback": getattr(args, "allow_host_loopback", None) or None,
        "no_proxy_env": getattr(args, "no_proxy_env", None) or None,
        "oc_opts": list(getattr(args, "oc_opt", None) or []),
        "passwd_file": getattr(args, "passwd_file", None),
    }


@dataclass
class Effective:
    file: FileConfig
    profile: Sourced
    values: Dict[str, Sourced]

    def to_json_dict(self) -> dict:
        return show_dict(self.values, self.file, self.profile)


def effective(args, env: Optional[Mapping[str, str]] = None) -> Effective:
    """Load the file named by args.config (or the default one) and resolve every key."""
    env = dict(os.environ) if env is None else env
    path = getattr(args, "config", None)
    if not path and env.get("NSVPN_CONFIG"):
        path = env["NSVPN_CONFIG"]
    fc = load_file(Path(path) if path else None, explicit=bool(path), env=env)
    prof = select_profile(getattr(args, "profile", None), env)
    values = resolve(cli_values(args), env, fc, prof.value)
    _tsocks_upstream(values)
    return Effective(fc, prof, values)


def apply_to_args(args, env: Optional[Mapping[str, str]] = None) -> Effective:
    """Resolve and write the effective values back onto the exec namespace, so the rest of
    `exec` reads args.via/args.direct/... as before. ConfigError when there is no upstream."""
    eff = effective(args, env)
    v = eff.values
    if not v["via"].value:
        raise ConfigError(
            "no upstream given: use --via URL, set NSVPN_VIA, or put via = \"ssh://host\" in "
            f"{eff.file.path or default_config_path(env)}"
        )
    args.via = list(v["via"].value)
    args.direct = list(v["direct"].value)
    args.no_direct = bool(v["no_direct"].value)
    args.dns_server = v["dns_server"].value
    args.ssh_opt = list(v["ssh_opts"].value)
    args.mode = v["mode"].value
    args.upstream_policy = v["upstream_policy"].value
    args.tsocks_conf = v["tsocks_conf"].value
    args.allow_host_loopback = bool(v["allow_host_loopback"].value)
    args.no_proxy_env = bool(v["no_proxy_env"].value)
    args.oc_opt = list(v["oc_opts"].value)
    # --passwd-fd on the command line wins over a passwd_file from anywhere else
    if getattr(args, "passwd_fd", None) is None or v["passwd_file"].level == 0:
        args.passwd_file = v["passwd_file"].value
    return eff


def _tsocks_upstream(v: Dict[str, Sourced]) -> None:
    """A tsocks.conf's server is an upstream given at the tsocks_conf's own level: it replaces
    a `via` from a weaker source (--tsocks-conf beats $NSVPN_VIA; a profile's tsocks_conf beats
    the file's top-level via) and yields to one from the same or a stronger source."""
    ts = v["tsocks_conf"]
    if not ts.value or (v["via"].value and v["via"].level <= ts.level):
        return
    from .tsocks_conf import parse_tsocks_conf

    try:
        with open(ts.value, encoding="utf-8") as f:
            conf = parse_tsocks_conf(f.read(), ts.value)
    except OSError as e:
        raise ConfigError(f"cannot read tsocks_conf {ts.value} ({ts.source}): "
                          f"{e.strerror}") from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if conf.default is not None:
        v["via"] = Sourced([conf.default_url()], f"{ts.source} (tsocks.conf server)", ts.level)
