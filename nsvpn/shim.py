"""Where the LD_PRELOAD shim comes from: the installed build, or one made at first use.

    path, how = locate()     # how: "installed", "NSVPN_SHIM", "built", "prebuilt", "cached"
    problem()                # one line why there is none (after locate() returned None)
    trial_load(path)         # (ok, detail): does it load into `true`?

`pip install` builds the shim as nsvpn/_preload*.so next to this module. A single-file
nsvpn.pyz (scripts/build-pyz) cannot do that, and the loader cannot map a library from inside
a zip, so the pyz carries the shim's C source (nsvpn/_shim/nsvpn_preload.c) and, optionally,
one prebuilt for the build host's arch (nsvpn/_shim/prebuilt-ARCH-LIBC.so). At first use the
source is compiled with the node's C compiler ($CC, cc, gcc or clang), or else the prebuilt one
is extracted, into a node-local private cache ($XDG_RUNTIME_DIR/nsvpn/shim, or
/tmp/nsvpn-UID-HOST/shim: never $HOME, which nodes share), named by a hash of what went in. A
library is moved to its final name only after it loaded into `true`, so a later run trusts a
cached file without a new trial.

NSVPN_SHIM=/path/lib.so names a shim to use as is; NSVPN_SHIM_NO_PREBUILT=1 ignores the
prebuilt one (a site that wants only libraries compiled on its nodes).
"""

from __future__ import annotations

import glob
import hashlib
import os
import pkgutil
import platform
import shutil
import subprocess
from typing import Optional, Tuple

SOURCE_NAME = "nsvpn_preload.c"
CFLAGS = ["-O2", "-fvisibility=hidden", "-fPIC", "-shared", "-U_FORTIFY_SOURCE"]
LDLIBS = ["-ldl"]
COMPILE_TIMEOUT = 120.0

_HERE = os.path.dirname(os.path.abspath(__file__))
_found: Optional[Tuple[str, str]] = None
_problem: Optional[str] = None


def arch_tag() -> str:
    """The key of a prebuilt shim: CPU and C library (a glibc build does not load on musl)."""
    libc = (platform.libc_ver()[0] or "unknown").lower()
    return f"{platform.machine() or 'unknown'}-{libc}"


def installed() -> Optional[str]:
    """The shim `pip install` built next to this module, if any."""
    found = sorted(glob.glob(os.path.join(_HERE, "_preload*.so")))
    return found[0] if found else None


def _resource(name: str) -> Optional[bytes]:
    # pkgutil reads from a zip (the pyz) and from a directory alike
    try:
        return pkgutil.get_data(__package__ or "nsvpn", "_shim/" + name)
    except OSError:
        return None


def bundled_source() -> Optional[bytes]:
    """The shim's C source: inside the pyz, or fallback/ of a source checkout."""
    data = _resource(SOURCE_NAME)
    if data is None:
        try:
            with open(os.path.join(os.path.dirname(_HERE), "fallback", SOURCE_NAME), "rb") as f:
                data = f.read()
        except OSError:
            return None
    return data


def bundled_prebuilt() -> Optional[bytes]:
    return _resource(f"prebuilt-{arch_tag()}.so")


def compiler() -> Optional[str]:
    cc = os.environ.get("CC", "").split()
    if cc and shutil.which(cc[0]):
        return shutil.which(cc[0])
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def cache_dir(name: str = "shim") -> str:
    """Node-local, private (0700, ours): the same root as the named tunnels' state. ("pyz" is
    where the single-file nsvpn.pyz unpacks itself, see scripts/build-pyz.)"""
    from .tunnels import TunnelError, _private_dir, state_root  # one rule for node state

    try:
        return _private_dir(os.path.join(os.path.dirname(state_root()), name))
    except TunnelError as e:  # a state directory someone else owns
        raise OSError(str(e)) from None


def trial_load(path: str, timeout: float = 10.0) -> Tuple[bool, str]:
    """Run `true` with the shim preloaded; it writes its version to NSVPN_PROBE_FD."""
    true = shutil.which("true") or "/bin/true"
    r, w = os.pipe()
    try:
        env = dict(os.environ, LD_PRELOAD=path, NSVPN_PROBE_FD=str(w))
        proc = subprocess.run([true], env=env, pass_fds=(w,), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              timeout=timeout)
        os.close(w)
        w = -1
        marker = os.read(r, 200).decode(errors="replace").strip()
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"running `true` with the shim failed: {e}"
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    if proc.returncode != 0 or not marker.startswith("nsvpn-shim"):
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        return False, (err[-1] if err else f"exit status {proc.returncode}, no marker")
    return True, marker


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "big") + p)
    return h.hexdigest()[:16]


def _accept(tmp: str, final: str) -> Tuple[bool, str]:
    """Trial-load tmp; on success it becomes `final` (atomic: racing pilots are fine)."""
    ok, detail = trial_load(tmp)
    if ok:
        os.replace(tmp, final)
    else:
        os.unlink(tmp)
    return ok, detail


def _build(src: bytes, cc: str, d: str, final: str) -> Tuple[bool, str]:
    from .upstream.ssh import unique_tag  # not at import: the pyz's start-up imports this

    tag = unique_tag()
    c_file = os.path.join(d, f".src-{tag}.c")
    tmp = os.path.join(d, f".build-{tag}.so")
    with open(c_file, "wb") as f:
        f.write(src)
    try:
        p = subprocess.run([cc, *CFLAGS, "-o", tmp, c_file, *LDLIBS], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=COMPILE_TIMEOUT)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"{cc} failed: {e}"
    finally:
        os.unlink(c_file)
    if p.returncode != 0:
        lines = [x for x in p.stdout.decode(errors="replace").splitlines() if "error" in x]
        if os.path.exists(tmp):
            os.unlink(tmp)
        first = lines[0].strip() if lines else f"exit status {p.returncode}"
        return False, f"{cc} failed: {first}"
    ok, detail = _accept(tmp, final)
    return ok, (detail if ok else f"the shim built by {cc} does not load: {detail}")


def _extract(blob: bytes, d: str, final: str) -> Tuple[bool, str]:
    from .upstream.ssh import unique_tag

    tmp = os.path.join(d, f".prebuilt-{unique_tag()}.so")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    ok, detail = _accept(tmp, final)
    return ok, (detail if ok else f"the prebuilt shim for {arch_tag()} does not load: {detail}")


def locate() -> Optional[Tuple[str, str]]:
    """(path, how) of a usable shim, building or extracting it at first use; None with
    problem() set when there is none. Remembered for the rest of the process."""
    global _found, _problem
    if _found is not None:
        return _found
    env_path = os.environ.get("NSVPN_SHIM")
    if env_path:
        _found = (env_path, "NSVPN_SHIM")
        return _found
    path = installed()
    if path:
        _found = (path, "installed")
        return _found
    src = bundled_source()
    pre = None if os.environ.get("NSVPN_SHIM_NO_PREBUILT") else bundled_prebuilt()
    if src is None and pre is None:
        _problem = ("the LD_PRELOAD shim is not built (no nsvpn/_preload*.so) and its C source "
                    "is not bundled: reinstall nsvpn with a C compiler available")
        return None
    try:
        d = cache_dir()
    except OSError as e:
        _problem = f"no private cache directory for the LD_PRELOAD shim: {e}"
        return None
    machine = platform.machine().encode()
    key = _digest(src or b"", " ".join(CFLAGS).encode(), machine)
    built = os.path.join(d, f"nsvpn-shim-{key}.so")
    extracted = os.path.join(d, f"nsvpn-shim-prebuilt-{_digest(pre or b'')}.so")
    for cand, ok in ((built, src is not None), (extracted, pre is not None)):
        if ok and os.path.isfile(cand):
            _found = (cand, "cached")
            return _found
    why = []
    cc = compiler() if src is not None else None
    if src is not None and cc is None:
        why.append("no C compiler ($CC, cc, gcc or clang) in PATH to build it from the bundled "
                   "source")
    if cc is not None:
        ok, detail = _build(src or b"", cc, d, built)
        if ok:
            _found = (built, "built")
            return _found
        why.append(detail)
    if pre is not None:
        ok, detail = _extract(pre, d, extracted)
        if ok:
            _found = (extracted, "prebuilt")
            return _found
        why.append(detail)
    elif os.environ.get("NSVPN_SHIM_NO_PREBUILT"):
        why.append("prebuilt shims are disabled (NSVPN_SHIM_NO_PREBUILT)")
    else:
        why.append(f"no prebuilt shim for {arch_tag()} is bundled")
    _problem = "no LD_PRELOAD shim: " + "; ".join(why)
    return None


def problem() -> str:
    return _problem or "no LD_PRELOAD shim"
