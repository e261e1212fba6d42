"""The single-file nsvpn.pyz (scripts/build-pyz) end to end in the lab.

The pyz is built once per module (with and without a prebuilt shim) and run by the SYSTEM
python3 (never the venv: the point is that nothing needs to be installed) as the unprivileged
user in the worker netns, each test with its own fresh XDG_RUNTIME_DIR, so the shim cache
starts empty: `probe --json`, `exec` in namespace mode over ssh and SOCKS5 with a sha256 check,
`exec --mode preload` with the shim compiled at first use, the prebuilt shim on a node without a
compiler, and the one-line error when there is neither.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import zipfile
from typing import Dict, Iterator, List

import labenv
import pytest

pytestmark = pytest.mark.lab

SYSTEM_PYTHON = "/usr/bin/python3"
CURL_SHA = ("PATH=/usr/bin:/bin; curl -sS --fail --max-time 60 http://remote.lab/{name} "
            "| sha256sum")


@pytest.fixture(scope="module")
def pyz_dir(lab: labenv.Lab) -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="nsvpn-pyz-test-", dir="/tmp")
    os.chmod(d, 0o755)  # the test user runs the files in it
    py = os.path.join(lab.venv, "bin", "python")
    script = os.path.join(labenv.REPO, "scripts", "build-pyz")
    for name, extra in (("nsvpn.pyz", []), ("noprebuilt.pyz", ["--no-prebuilt"])):
        r = subprocess.run([py, script, "-o", os.path.join(d, name), *extra],
                           capture_output=True, text=True, timeout=600,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, f"scripts/build-pyz {extra} failed:\n{r.stderr[-3000:]}"
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def python_argv(lab: labenv.Lab, pyz_dir: str) -> List[str]:
    """How the test user runs a pyz with the system python and no installed packages: plain
    `python3 X.pyz` as a pilot would when that python has none of nsvpn's dependencies, else
    with -I -S (no site-packages at all), so a dependency missing from the pyz always fails."""
    r = lab.run([SYSTEM_PYTHON, "-c", "import trio"], env={"PATH": labenv.SYSTEM_PATH})
    if r.returncode != 0:
        assert "trio" in r.stderr
        return [SYSTEM_PYTHON]
    return [SYSTEM_PYTHON, "-I", "-S"]


@pytest.fixture
def rt(user_tmp: str) -> str:
    """A fresh private XDG_RUNTIME_DIR: the shim cache lives in rt/nsvpn/shim."""
    d = os.path.join(user_tmp, "rt")
    os.mkdir(d, 0o700)
    st = os.stat(user_tmp)
    os.chown(d, st.st_uid, st.st_gid)
    return d


@pytest.fixture
def no_cc_path(user_tmp: str) -> str:
    """A PATH with `true` and `sh` but no C compiler."""
    d = os.path.join(user_tmp, "bin")
    os.mkdir(d, 0o755)
    for tool in ("true", "sh"):
        os.symlink(shutil.which(tool, path=labenv.SYSTEM_PATH), os.path.join(d, tool))
    return d


def run_pyz(lab: labenv.Lab, argv: List[str], pyz: str, args: List[str], *, rt: str,
            path: str = labenv.SYSTEM_PATH, env: Dict[str, str] | None = None,
            timeout: float = 120.0) -> subprocess.CompletedProcess:
    e = {"PATH": labenv.SYSTEM_PATH, "XDG_RUNTIME_DIR": rt, "CC": None, "NSVPN_SHIM": None}
    e.update(env or {})
    # PATH is set by env(1): `ip netns exec` and setpriv themselves need the system PATH
    return lab.run(["/usr/bin/env", f"PATH={path}", *argv, pyz, *args], env=e,
                   timeout=timeout)


def explain(r: subprocess.CompletedProcess) -> str:
    return f"exit {r.returncode}\nstdout: {r.stdout[-2000:]!r}\nstderr: {r.stderr[-3000:]!r}"


def shim_files(rt: str) -> List[str]:
    d = os.path.join(rt, "nsvpn", "shim")
    return sorted(f for f in os.listdir(d) if f.endswith(".so")) if os.path.isdir(d) else []


def test_pyz_holds_nsvpn_its_pure_python_deps_and_the_shim_source(pyz_dir: str):
    with zipfile.ZipFile(os.path.join(pyz_dir, "nsvpn.pyz")) as z:
        names = z.namelist()
    tops = {n.split("/")[0] for n in names}
    for pkg in ("__main__.py", "nsvpn", "trio", "dns", "attr", "outcome", "sniffio",
                "sortedcontainers", "idna", "exceptiongroup", "tomli"):
        assert pkg in tops, pkg
    assert not tops & {"pyroute2", "python_socks"}  # not imported at run time
    assert "nsvpn/_shim/nsvpn_preload.c" in names
    libs = [n for n in names if n.endswith(".so")]
    assert len(libs) == 1 and libs[0].startswith("nsvpn/_shim/prebuilt-"), libs
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    with zipfile.ZipFile(os.path.join(pyz_dir, "noprebuilt.pyz")) as z:
        assert not [n for n in z.namelist() if n.endswith(".so")]


def test_probe_json_builds_the_shim_once(lab, pyz_dir, python_argv, rt, ssh_via):
    pyz = os.path.join(pyz_dir, "nsvpn.pyz")
    r = run_pyz(lab, python_argv, pyz, ["probe", "--json", "--via", ssh_via], rt=rt)
    assert r.returncode == 0, explain(r)
    d = json.loads(r.stdout)
    assert d["mode"] == "ns", d["reasons"]
    pre = d["checks"]["preload"]
    assert pre["ok"] and pre["data"]["source"] == "built", pre
    assert pre["data"]["path"].startswith(os.path.join(rt, "nsvpn", "shim") + "/")
    assert d["via"][0]["ok"], d["via"]
    st = os.stat(os.path.join(rt, "nsvpn", "shim"))
    assert st.st_mode & 0o777 == 0o700
    r = run_pyz(lab, python_argv, pyz, ["probe", "--json"], rt=rt)
    assert json.loads(r.stdout)["checks"]["preload"]["data"]["source"] == "cached"
    assert len(shim_files(rt)) == 1


def test_pyz_unpacks_once_and_runs_with_cached_byte_code(lab, pyz_dir, python_argv, rt):
    """Byte code of modules imported from a zip is never cached: the pyz runs from a copy
    unpacked into the private node-local cache, where __pycache__ works."""
    pyz = os.path.join(pyz_dir, "nsvpn.pyz")
    r = run_pyz(lab, python_argv, pyz, ["--version"], rt=rt)
    assert r.returncode == 0 and r.stdout.startswith("nsvpn "), explain(r)
    base = os.path.join(rt, "nsvpn", "pyz")
    (build,) = os.listdir(base)
    root = os.path.join(base, build)
    assert os.path.isfile(os.path.join(root, ".complete"))
    assert os.listdir(os.path.join(root, "nsvpn", "__pycache__"))
    assert os.stat(base).st_mode & 0o777 == 0o700
    # the second run imports from the unpacked copy's byte code (and from the zip if told so)
    r = run_pyz(lab, [*python_argv, "-v"], pyz, ["--version"], rt=rt)
    assert r.returncode == 0, explain(r)
    assert f"code object from '{root}/nsvpn/__pycache__/cli." in r.stderr
    assert f"code object from '{root}/trio/__pycache__/__init__." in r.stderr
    r = run_pyz(lab, [*python_argv, "-v"], pyz, ["--version"], rt=rt,
                env={"NSVPN_PYZ_NO_UNPACK": "1"})
    assert r.returncode == 0 and r.stdout.startswith("nsvpn "), explain(r)
    assert root not in r.stderr
    assert os.listdir(base) == [build]


@pytest.fixture(scope="module")
def ssh_via(lab: labenv.Lab) -> str:
    return f"ssh://{lab.ssh['user']}@{lab.ssh['host']}"


@pytest.mark.parametrize("upstream", ["ssh", "socks5"])
def test_exec_ns_mode_byte_exact(lab, pyz_dir, python_argv, rt, ssh_via, upstream):
    via = ssh_via if upstream == "ssh" else lab.socks5["url"]
    r = run_pyz(lab, python_argv, os.path.join(pyz_dir, "nsvpn.pyz"),
                ["exec", "--mode", "ns", "--via", via, "--", "/bin/sh", "-c",
                 CURL_SHA.format(name="100M.bin")], rt=rt)
    assert r.returncode == 0, explain(r)
    assert r.stdout.split()[0] == lab.sha256["100M.bin"], explain(r)
    assert shim_files(rt) == []  # namespace mode never needs the shim


def test_exec_preload_builds_the_shim_at_first_use(lab, pyz_dir, python_argv, rt, ssh_via):
    # without a prebuilt shim in the pyz, only the node's compiler can make one
    pyz = os.path.join(pyz_dir, "noprebuilt.pyz")
    def cmd(via: str) -> List[str]:
        return ["exec", "--mode", "preload", "--via", via, "--", "/bin/sh", "-c",
                CURL_SHA.format(name="1M.bin")]

    r = run_pyz(lab, python_argv, pyz, cmd(ssh_via), rt=rt)
    assert r.returncode == 0, explain(r)
    assert r.stdout.split()[0] == lab.sha256["1M.bin"], explain(r)
    built = shim_files(rt)
    assert len(built) == 1 and "prebuilt" not in built[0], built
    # the second run takes it from the cache, even with no compiler left in PATH
    r = run_pyz(lab, python_argv, pyz, cmd(lab.socks5["url"]), rt=rt, path="/nonexistent")
    assert r.returncode == 0 and r.stdout.split()[0] == lab.sha256["1M.bin"], explain(r)
    assert shim_files(rt) == built


def test_prebuilt_shim_on_a_node_without_compiler(lab, pyz_dir, python_argv, rt, no_cc_path):
    r = run_pyz(lab, python_argv, os.path.join(pyz_dir, "nsvpn.pyz"),
                ["exec", "--mode", "preload", "--via", lab.socks5["url"], "--", "/bin/sh", "-c",
                 CURL_SHA.format(name="1M.bin")], rt=rt, path=no_cc_path)
    assert r.returncode == 0, explain(r)
    assert r.stdout.split()[0] == lab.sha256["1M.bin"], explain(r)
    files = shim_files(rt)
    assert len(files) == 1 and "prebuilt" in files[0], files


@pytest.mark.parametrize("case", ["no-prebuilt-in-pyz", "prebuilt-disabled"])
def test_no_compiler_and_no_prebuilt_is_one_clear_line(lab, pyz_dir, python_argv, rt,
                                                        no_cc_path, case):
    if case == "no-prebuilt-in-pyz":
        pyz, env, why = os.path.join(pyz_dir, "noprebuilt.pyz"), {}, "no prebuilt shim for"
    else:
        pyz, env = os.path.join(pyz_dir, "nsvpn.pyz"), {"NSVPN_SHIM_NO_PREBUILT": "1"}
        why = "prebuilt shims are disabled (NSVPN_SHIM_NO_PREBUILT)"
    r = run_pyz(lab, python_argv, pyz, ["probe", "--json"], rt=rt, path=no_cc_path, env=env)
    d = json.loads(r.stdout)
    pre = d["checks"]["preload"]
    assert not pre["ok"] and "no C compiler" in pre["detail"] and why in pre["detail"], pre
    assert d["mode"] == "ns"  # namespace mode does not need the shim
    r = run_pyz(lab, python_argv, pyz, ["exec", "--mode", "preload", "--via",
                                        lab.socks5["url"], "--", "/bin/true"],
                rt=rt, path=no_cc_path, env=env)
    assert r.returncode == 4, explain(r)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nsvpn: ") and "no C compiler" in lines[0] \
        and why in lines[0], explain(r)
    assert shim_files(rt) == []


def test_shared_tunnel_from_the_pyz(lab, pyz_dir, python_argv, rt):
    """up (a daemon forked from the zipapp), exec --name, status, down."""
    pyz = os.path.join(pyz_dir, "nsvpn.pyz")
    name = f"pyz{os.getpid()}"
    r = run_pyz(lab, python_argv, pyz, ["up", "--name", name, "--via", lab.socks5["url"]],
                rt=rt)
    assert r.returncode == 0, explain(r)
    try:
        r = run_pyz(lab, python_argv, pyz, ["exec", "--name", name, "--", "/bin/sh", "-c",
                                            CURL_SHA.format(name="1M.bin")], rt=rt)
        assert r.returncode == 0 and r.stdout.split()[0] == lab.sha256["1M.bin"], explain(r)
        r = run_pyz(lab, python_argv, pyz, ["status", name, "--json"], rt=rt)
        assert r.returncode == 0, explain(r)
        assert name in r.stdout and "running" in r.stdout, explain(r)
    finally:
        r = run_pyz(lab, python_argv, pyz, ["down", name], rt=rt)
    assert r.returncode == 0, explain(r)
    assert not os.path.exists(os.path.join(rt, "nsvpn", "tunnels", name))


def other_pythons() -> List[str]:
    """Interpreters besides the system one to run the pyz with: $NSVPN_PYZ_PYTHONS (space
    separated), else any pyenv 3.x of root's (this is how 3.9, the oldest supported, is tried)."""
    env = os.environ.get("NSVPN_PYZ_PYTHONS")
    if env:
        return env.split()
    import glob

    return sorted(glob.glob("/root/.pyenv/versions/3.*/bin/python3"))


@pytest.mark.parametrize("python", other_pythons() or ["(none)"])
def test_pyz_on_other_python_versions(lab, pyz_dir, python, tmp_path):
    """Root's interpreters (root's pyenv is not readable by the test user): namespace and
    preload mode, byte-exact; Python < 3.9 is refused with one line."""
    if python == "(none)":
        pytest.skip("no other python3 (set NSVPN_PYZ_PYTHONS or install pyenv versions)")
    pyz = os.path.join(pyz_dir, "nsvpn.pyz")
    ver = lab.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                  user=None, env={"PATH": labenv.SYSTEM_PATH}).stdout.strip()
    env = {"PATH": labenv.SYSTEM_PATH, "XDG_RUNTIME_DIR": str(tmp_path)}
    if tuple(int(x) for x in ver.split(".")) < (3, 9):
        r = lab.run([python, "-I", pyz, "probe"], user=None, env=env)
        assert r.returncode == 1 and r.stderr.strip() == f"nsvpn needs Python >= 3.9, this is {ver}"
        return
    for mode in ("ns", "preload"):
        r = lab.run([python, "-I", pyz, "exec", "--mode", mode, "--via", lab.socks5["url"], "--",
                     "/bin/sh", "-c", CURL_SHA.format(name="1M.bin")], user=None, env=env,
                    timeout=120)
        assert r.returncode == 0, f"python {ver}, {mode}: " + explain(r)
        assert r.stdout.split()[0] == lab.sha256["1M.bin"], explain(r)


def test_exec_openconnect_from_the_pyz(lab, pyz_dir, python_argv, rt):
    """openconnect runs `python -m nsvpn.oc_attach` as its --script: from the pyz (nothing
    installed) that helper must still find nsvpn (PYTHONPATH in openconnect's environment
    only; CMD's environment gets none of it)."""
    oc = lab.ocserv
    with open(os.path.join(lab.info["state_dir"], "ocserv", "pin-sha256")) as f:
        pin = f.read().strip()
    script = CURL_SHA.format(name="1M.bin") + "; echo PYTHONPATH=${PYTHONPATH-unset}"
    r = run_pyz(lab, python_argv, os.path.join(pyz_dir, "nsvpn.pyz"),
                ["exec", "-q", "--mode", "ns", "--passwd-file", oc["password_file"],
                 f"--oc-opt=--servercert={pin}",
                 "--via", f"openconnect://{oc['user']}@{oc['host']}:{oc['port']}",
                 "--", "/bin/sh", "-c", script], rt=rt)
    assert r.returncode == 0, explain(r)
    assert r.stdout.split()[0] == lab.sha256["1M.bin"], explain(r)
    assert "PYTHONPATH=unset" in r.stdout, explain(r)
