"""nsvpn inside nsvpn: a command's environment without the enclosing preload session's.

A pilot may wrap a whole job in `nsvpn exec --mode preload`, and the job run `nsvpn exec`
again. The inner nsvpn itself should stay under the outer shim (its ssh reaches the login node
through the outer front), but its CMD must not: in a new network namespace 127.0.0.1 is
another host, so the outer shim and proxy variables would send every connect to a port nobody
listens on; under a new shim the outer one would only be loaded twice.
"""

from __future__ import annotations

import re
from typing import Dict, Mapping

# what preload.build_env / Front.shim_env put in a session's environment
SESSION_VARS = ("NSVPN_CTL", "NSVPN_FRONT_PORT4", "NSVPN_FRONT_PORT6", "NSVPN_DIRECT",
                "NSVPN_DNS_PORT4", "NSVPN_DNS_PORT6", "NSVPN_FRONT_PROTO",
                "NSVPN_FRONT_HANDOFF")
SHIM_MARKER = b"nsvpn-shim"  # the shim's version string starts with it


def is_nsvpn_shim(path: str) -> bool:
    """Is this LD_PRELOAD entry one of our shims (whatever its file name)?"""
    try:
        with open(path, "rb") as f:
            return SHIM_MARKER in f.read(8 << 20)
    except OSError:
        return False


def without_session(env: Mapping[str, str]) -> Dict[str, str]:
    """`env` minus an enclosing session's shim, its NSVPN_* settings (NSVPN_CTL stays, empty)
    and the ALL_PROXY and http(s)_proxy that point at its front. An environment with no
    session is returned unchanged (a copy)."""
    out = dict(env)
    port = out.get("NSVPN_FRONT_PORT4")
    if not port:  # no session around us (a site-wide LD_PRELOAD is not even read)
        return out
    for k in SESSION_VARS:
        out.pop(k, None)
    # present but empty: the outer shim, still loaded in this nsvpn, puts a session back into
    # an environment that has no NSVPN_CTL at all (see the shim's exec hooks)
    out["NSVPN_CTL"] = ""
    for k in ("ALL_PROXY", "all_proxy"):
        v = out.get(k, "")
        if v.startswith("socks5h://") and v.endswith(f"@127.0.0.1:{port}"):
            del out[k]
    for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        v = out.get(k, "")
        if v.startswith("http://") and (v.endswith(f"@127.0.0.1:{port}")
                                        or v == f"http://127.0.0.1:{port}"):
            del out[k]
    pre = out.get("LD_PRELOAD", "")
    entries = [p for p in re.split(r"[ :]+", pre) if p]
    kept = [p for p in entries if not is_nsvpn_shim(p)]
    if len(kept) != len(entries):
        if kept:
            out["LD_PRELOAD"] = " ".join(kept)
        else:
            del out["LD_PRELOAD"]
    return out
