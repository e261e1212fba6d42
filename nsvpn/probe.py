"""`nsvpn probe`: real trials of what works on this node, and the mode `nsvpn exec` would pick.

Each check is an actual attempt (fork + unshare, open the TUN, bind mount, load the shim,
run the tools, connect to the upstream) rather than a reading of sysctls, because sites
restrict these in many different ways (sysctls, AppArmor, seccomp, container runtimes).
The sysctls are read only to explain a failure.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

from . import namespace

SCHEMA_VERSION = 1


@dataclass
class Check:
    ok: bool
    detail: str
    data: Dict[str, object] = field(default_factory=dict)


@dataclass
class Capabilities:
    mode: str  # "ns", "preload" or "none"
    reasons: List[str]
    checks: Dict[str, Check]
    via: List[Dict[str, object]]
    elapsed_ms: float
    commands: List[Dict[str, object]] = field(default_factory=list)

    def to_json_dict(self) -> Dict[str, object]:
        return {
            "schema": SCHEMA_VERSION,
            "mode": self.mode,
            "reasons": self.reasons,
            "checks": {k: asdict(v) for k, v in self.checks.items()},
            "via": self.via,
            "commands": self.commands,
            "elapsed_ms": round(self.elapsed_ms, 1),
        }


def shim_path() -> Optional[str]:
    """The LD_PRELOAD shim: installed, or built/extracted at first use (nsvpn/shim.py)."""
    from . import shim

    found = shim.locate()
    return found[0] if found else None


def _trial(fn) -> Check:
    r = fn()
    return Check(bool(r.ok), r.detail, dict(getattr(r, "data", {}) or {}))


def check_preload() -> Check:
    from . import shim

    found = shim.locate()
    if found is None:
        return Check(False, shim.problem(), {"source": None})
    path, how = found
    ok, detail = shim.trial_load(path)
    if not ok:
        return Check(False, f"shim does not load: {detail}", {"path": path, "source": how})
    return Check(True, f"loads into `true` ({detail}; {how})",
                 {"path": path, "version": detail, "source": how})


def _tool_version(name: str, args: List[str]) -> Check:
    # Debian installs openconnect in /usr/sbin, which is not in a normal user's PATH.
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        return Check(False, f"{name} not found in PATH, /usr/sbin or /sbin")
    try:
        p = subprocess.run([path, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=5)
    except (OSError, subprocess.SubprocessError) as e:
        return Check(False, f"{path}: {e}", {"path": path})
    first = (p.stdout.decode(errors="replace").strip().splitlines() or ["?"])[0]
    return Check(True, first, {"path": path, "version": first})


def check_via(url: str, timeout: float = 1.5, ssh_opts: Sequence[str] = ()) -> Dict[str, object]:
    """Can the upstream's host:port be reached with a plain TCP connect (bounded)? For ssh://
    the user's ssh config decides where that is (HostName, Port, ProxyJump), as for exec."""
    from .urls import parse_upstream_url

    try:
        up = parse_upstream_url(url)
    except ValueError as e:
        return {"url": url, "ok": False, "detail": str(e)}
    default_port = {"ssh": 22, "openconnect": 443}.get(up.scheme, 1080)
    host, port = up.host, up.port or default_port
    shown = str(up)  # never shows a password
    note = ""
    if up.scheme == "ssh" and shutil.which("ssh"):
        from .upstream.ssh import config_forwards, effective_config, expand_ssh_opts

        conf = effective_config("ssh", expand_ssh_opts(ssh_opts), up.port,
                                up.ssh_destination())
        first = {}
        for k, v in conf:
            first.setdefault(k, v)
        forwards = config_forwards(conf)
        if forwards:
            note = f"; your ssh config adds forwardings for it ({', '.join(forwards)})"
        for k in ("proxyjump", "proxycommand"):
            if first.get(k, "none") != "none":
                return {"url": shown, "ok": True,
                        "detail": f"through {k} {first[k]} (ssh's own path: not checked){note}"}
        host = first.get("hostname", host)
        port = int(first.get("port", port))
    t0 = time.monotonic()
    udp = None
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            ms = (time.monotonic() - t0) * 1000
            if up.scheme in ("socks5", "socks5h"):
                udp, note = _socks5_udp_trial(conn, up.user, getattr(up, "password", None))
                if udp is None:  # not a usable SOCKS5 proxy: exec would fail too
                    return {"url": shown, "ok": False,
                            "detail": f"{host}:{port} reachable, but {note}"}
    except socket.gaierror as e:
        return {"url": shown, "ok": False, "detail": f"cannot resolve {host}: {e.strerror}"}
    except socket.timeout:
        return {"url": shown, "ok": False, "detail": f"{host}:{port}: no answer in {timeout:g} s"}
    except OSError as e:
        return {"url": shown, "ok": False, "detail": f"{host}:{port}: {e.strerror}"}
    if up.scheme == "ssh":
        udp, note = False, note + "; TCP only (ssh -D has no UDP)"
    out = {"url": shown, "ok": True, "detail": f"{host}:{port} reachable ({ms:.1f} ms){note}"}
    if udp is not None:
        out["udp"] = udp
    return out


def _socks5_udp_trial(conn: socket.socket, user, password):
    """(relays UDP?, note) from a real greeting and UDP ASSOCIATE on `conn` (which bounds
    every step by its timeout); None when the proxy did not get that far."""
    from . import socks

    hs = socks.ClientHandshake(socks.CMD_UDP_ASSOCIATE, "0.0.0.0", 0, user, password)
    try:
        while hs.reply is None:
            out = hs.data_to_send()
            if out:
                conn.sendall(out)
            data = conn.recv(512)
            if not data:
                if hs.awaiting_reply:  # some proxies hang up on a command they lack
                    return False, "; SOCKS5 without UDP (it closed on UDP ASSOCIATE)"
                return None, "the proxy closed the connection during the SOCKS5 greeting"
            hs.receive_data(data)
    except socks.SocksReplyError as e:
        if e.reply_code == socks.REP_COMMAND_NOT_SUPPORTED:
            return False, "; SOCKS5 without UDP (UDP gets ICMP port unreachable in ns mode)"
        return False, f"; SOCKS5 UDP ASSOCIATE refused: {e}"
    except socks.SocksError as e:
        return None, f"SOCKS5: {e}"
    except OSError as e:  # timeout, reset
        if hs.awaiting_reply:
            return False, f"; SOCKS5 without UDP (no answer to UDP ASSOCIATE: {e})"
        return None, f"the SOCKS5 greeting failed: {e.strerror or e}"
    return True, "; SOCKS5, relays UDP"


def check_command(cmd: str) -> Dict[str, object]:
    """Can preload mode divert `cmd`? (namespace mode does not care how it is linked)."""
    from .preload import _resolve, check_binary

    path = _resolve(cmd)
    if path is None:
        return {"command": cmd, "ok": False, "preload_ok": False,
                "detail": "not found (or not executable)", "warnings": []}
    warnings = check_binary(cmd)
    detail = "preload mode can divert it" if not warnings else "; ".join(warnings)
    return {"command": cmd, "path": path, "ok": True, "preload_ok": not warnings,
            "detail": detail, "warnings": warnings}


def run_probe(vias: List[str], commands: Sequence[str] = (),
              ssh_opts: Sequence[str] = ()) -> Capabilities:
    t0 = time.monotonic()
    checks: Dict[str, Check] = {}
    checks["userns"] = _trial(namespace.trial_userns)
    if checks["userns"].ok:
        checks["tun"] = _trial(namespace.trial_tun)
        checks["mount"] = _trial(namespace.trial_bind_mount)
    else:
        checks["tun"] = Check(False, "not tried: user namespaces are unusable")
        checks["mount"] = Check(False, "not tried: user namespaces are unusable")
    checks["preload"] = check_preload()
    checks["ssh"] = _tool_version("ssh", ["-V"])
    checks["openconnect"] = _tool_version("openconnect", ["--version"])
    via = [check_via(u, ssh_opts=ssh_opts) for u in vias]

    reasons: List[str] = []
    if checks["userns"].ok and checks["tun"].ok and checks["mount"].ok:
        mode = "ns"
        reasons.append("user+net+mount namespaces, TUN and bind mounts work")
    else:
        for k in ("userns", "tun", "mount"):
            if not checks[k].ok and not checks[k].detail.startswith("not tried"):
                reasons.append(f"ns mode unusable: {k}: {checks[k].detail}")
        if checks["preload"].ok:
            mode = "preload"
            reasons.append("falling back to the LD_PRELOAD shim")
        else:
            mode = "none"
            reasons.append(f"preload unusable: {checks['preload'].detail}")
    cmds = [check_command(c) for c in commands]
    return Capabilities(mode, reasons, checks, via, (time.monotonic() - t0) * 1000, cmds)


def format_table(caps: Capabilities) -> str:
    rows = [(name, "ok" if c.ok else "FAIL", c.detail) for name, c in caps.checks.items()]
    rows += [("via " + str(v["url"]), "ok" if v["ok"] else "FAIL", str(v["detail"]))
             for v in caps.via]
    rows += [("check " + str(c["command"]), "ok" if c["preload_ok"] else "WARN",
              str(c["detail"])) for c in caps.commands]
    w = max(len(r[0]) for r in rows)
    lines = [f"{n:<{w}}  {s:<4}  {d}" for n, s, d in rows]
    lines.append("")
    lines.append(f"{'mode':<{w}}  {caps.mode}")
    lines += [f"{'':<{w}}  - {r}" for r in caps.reasons]
    return "\n".join(lines)
