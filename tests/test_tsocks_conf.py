"""tsocks.conf import: the parser (no privileges) and the routing it sets up (lab)."""

from __future__ import annotations

import os

import labenv
import pytest

from nsvpn.tsocks_conf import TsocksConfError, parse_tsocks_conf

SITE_CONF = """
# site file, as tsocks 1.8 reads it
local = 192.168.0.0/255.255.255.0
local = 10.0.0.0/8
path {
    reaches = 150.0.0.0/255.255.0.0
    reaches = 150.1.0.0:80-90/255.255.0.0   # ports too
    server = 10.1.7.25
    server_port = 1081
    server_type = 5
    default_user = delius
    default_pass = s3cr:t
}
server = 192.168.0.1
server_type = 5
server_port = 1080
"""


def test_site_file_maps_to_upstream_direct_and_paths():
    c = parse_tsocks_conf(SITE_CONF)
    assert c.default_url() == "socks5://192.168.0.1:1080"
    assert [str(n) for n in c.local] == ["192.168.0.0/24", "10.0.0.0/8"]
    (p,) = c.paths
    assert p.server.url() == "socks5://delius:s3cr%3At@10.1.7.25:1081"
    assert p.reaches[0].matches("150.0.3.4", 443)
    assert p.reaches[1].matches("150.1.2.3", 85) and not p.reaches[1].matches("150.1.2.3", 91)
    assert not p.reaches[0].matches("151.0.0.1", 443)
    assert not p.reaches[0].matches("remote.lab", 80)  # names are never matched


@pytest.mark.parametrize("text, words", [
    ("server = 1.2.3.4\nserver_type = 4\n", "SOCKS4"),
    ("servr = 1.2.3.4\n", "unknown key 'servr'"),
    ("path {\nserver = 1.2.3.4\n}\n", "without 'reaches'"),
    ("path {\nreaches = 1.0.0.0/8\n", "not closed"),
    ("local = 1.2.3.4\n", "ADDRESS/MASK"),
    ("local = 1.2.3.0/255.0.255.0\n", "tsocks.conf:1"),
    ("server = 1.2.3.4\nserver_port = 70000\n", "out of range"),
    ("}\n", "without a path"),
    ("path {\nreaches = 1.0.0.0/8\nserver_port = 1\n}\n", "no server"),
])
def test_bad_files_name_the_line(text, words):
    with pytest.raises(TsocksConfError, match=words.replace("(", r"\(")):
        parse_tsocks_conf(text)


@pytest.mark.lab
@pytest.mark.parametrize("given", ["flag", "env"])
def test_path_section_routes_through_its_own_server(nsvpn_lab: labenv.Lab, user_tmp: str,
                                                    given: str):
    """Default server = the lab's microsocks; a path for remote:80 uses a private microsocks.
    Killing the private one breaks exactly the path's destinations: routing is proven.
    The file works the same from --tsocks-conf and from NSVPN_TSOCKS_CONF (config layer)."""
    port = 1184
    ms = nsvpn_lab.popen(["microsocks", "-i", "172.31.1.1", "-p", str(port)], netns="edge",
                         user="nobody", cwd="/")
    nsvpn_lab.wait_for(lambda: nsvpn_lab.port_open("172.31.1.1", port), timeout=10,
                       what="private microsocks")
    conf = os.path.join(user_tmp, "tsocks.conf")
    with open(conf, "w") as f:
        f.write("server = 172.31.1.1\nserver_port = 1080\nserver_type = 5\n"
                "local = 172.31.1.0/255.255.255.0\n"
                f"path {{\n reaches = 172.31.2.2:80/255.255.255.255\n server = 172.31.1.1\n"
                f" server_port = {port}\n}}\n")
    os.chmod(conf, 0o644)
    sums = nsvpn_lab.info["files"]["1M.bin"]["sha256"]
    fifo = os.path.join(user_tmp, "go")
    os.mkfifo(fifo)
    os.chmod(fifo, 0o666)
    script = (f"curl -sS http://172.31.2.2/1M.bin | sha256sum; cat {fifo} >/dev/null; "
              "curl -sS -m 5 -o /dev/null -w 'path:%{http_code}\\n' http://172.31.2.2/1M.bin; "
              "xrdcp -f -s root://172.31.2.2//data/1M.bin /tmp/tc.bin && "
              "sha256sum /tmp/tc.bin; rm -f /tmp/tc.bin")
    flag = ["--tsocks-conf", conf] if given == "flag" else []
    env = {"NSVPN_TSOCKS_CONF": conf} if given == "env" else None
    p = nsvpn_lab.popen(["nsvpn", "exec", "-q", *flag, "--", "sh", "-c", script],
                        timeout=90, stdout=None, env=env)
    try:
        nsvpn_lab.wait_for(lambda: sums in p.output(), timeout=30, what="first download")
        ms.stop()  # the path's server goes away; the default one stays
        with open(fifo, "w") as f:
            f.write("go\n")
        assert p.wait(60) == 0, p.output()
    finally:
        p.stop()
    out = p.output().split()
    assert out[0] == sums, out
    assert "path:000" in out, out  # path destination: its (dead) server was used
    assert out.count(sums) == 2, out  # xrootd (port 1094) still went through the default
