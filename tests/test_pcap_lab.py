"""Observability end to end in the lab (issue 7): `--pcap` output that scapy parses and that
holds the test's own HTTP flow, the `--pcap-max` bound, and the SIGUSR1 counter dump (which
must not take SIGUSR1 away from CMD). Every command runs as the unprivileged test user in the
`worker` netns, which has no route out.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import uuid

import labenv
import pytest

pytestmark = pytest.mark.lab

SOCKS = "socks5://172.31.1.1:1080"


def explain(r: subprocess.CompletedProcess) -> str:
    return f"exit {r.returncode}\nstdout: {r.stdout[-2000:]!r}\nstderr: {r.stderr[-3000:]!r}"


def read_pcap(path: str):
    from scapy.utils import PcapReader

    with open(path, "rb") as f:
        head = f.read(24)
    assert int.from_bytes(head[20:24], "little") == 101  # LINKTYPE_RAW
    with PcapReader(path) as r:
        return list(r)


def test_pcap_holds_the_http_flow(nsvpn_lab: labenv.Lab, user_tmp: str):
    from scapy.layers.inet import IP, TCP

    pcap = os.path.join(user_tmp, "x.pcap")
    r = nsvpn_lab.run(["nsvpn", "exec", "--pcap", pcap, "--via", SOCKS, "--",
                       "curl", "-sS", "-o", "/dev/null", "-w", "%{remote_ip} %{size_download}",
                       "http://remote.lab/1M.bin"], timeout=120)
    assert r.returncode == 0, explain(r)
    ip, size = r.stdout.split()
    assert int(size) == 1048576
    pkts = read_pcap(pcap)
    flow = [p for p in pkts if IP in p and TCP in p
            and ip in (p[IP].src, p[IP].dst) and 80 in (p[TCP].sport, p[TCP].dport)]
    assert flow, f"no packet to/from {ip}:80 among {len(pkts)}"
    syn = [p for p in flow if p[IP].dst == ip and p[TCP].flags & 0x02]
    assert syn and syn[0][IP].src == "10.0.2.100"  # read from the TUN: the app's SYN
    synack = [p for p in flow if p[IP].src == ip and (p[TCP].flags & 0x12) == 0x12]
    assert synack  # written to the TUN: our stack's answer
    get = [p for p in flow if p[IP].dst == ip and bytes(p[TCP].payload).startswith(b"GET ")]
    assert get and b"GET /1M.bin HTTP/1.1" in bytes(get[0][TCP].payload)
    down = sum(len(bytes(p[TCP].payload)) for p in flow if p[IP].src == ip)
    assert down >= 1048576, down  # the whole body (plus headers) is in the capture
    fins = [p for p in flow if p[TCP].flags & 0x01]
    assert fins, "the flow's end is captured too"


def test_pcap_max_bounds_the_file(nsvpn_lab: labenv.Lab, user_tmp: str):
    pcap = os.path.join(user_tmp, "small.pcap")
    r = nsvpn_lab.run(["nsvpn", "exec", "--pcap", pcap, "--pcap-max", "0.2", "--via", SOCKS,
                       "--", "curl", "-sS", "-o", "/dev/null", "-w", "%{size_download}",
                       "http://remote.lab/1M.bin"], timeout=120)
    assert r.returncode == 0, explain(r)
    assert r.stdout == "1048576"  # the download is unaffected by the cap
    size = os.path.getsize(pcap)
    assert 1000 < size <= 200_000, size
    assert len(read_pcap(pcap)) > 2  # what was written is complete, parseable records
    lines = [x for x in r.stderr.splitlines() if "size limit" in x]
    assert len(lines) == 1, r.stderr


def test_pcap_refused_in_preload_mode(nsvpn_lab: labenv.Lab, user_tmp: str):
    marker = os.path.join(user_tmp, "ran")
    r = nsvpn_lab.run(["nsvpn", "exec", "--mode", "preload", "--pcap",
                       os.path.join(user_tmp, "p.pcap"), "--via", SOCKS, "--",
                       "touch", marker], timeout=60)
    assert r.returncode == 2, explain(r)
    assert "--pcap" in r.stderr and not os.path.exists(marker)


@pytest.mark.parametrize("to_file", [True, False], ids=["log-file", "stderr"])
def test_sigusr1_dumps_counters_and_still_reaches_cmd(nsvpn_lab: labenv.Lab, user_tmp: str,
                                                      to_file: bool):
    marker = "usr1" + uuid.uuid4().hex[:12]
    got = os.path.join(user_tmp, "got")
    ready = os.path.join(user_tmp, "ready")
    log = os.path.join(user_tmp, "nsvpn.log")
    opts = ["--log-file", log] if to_file else []
    # CMD: one download (so the counters are not zero), then wait for USR1 and record it
    script = (f": {marker}; curl -sS -o /dev/null http://remote.lab/1M.bin; "
              f"trap 'echo USR1 >> {got}' USR1; touch {ready}; "
              f"while [ ! -s {got} ]; do sleep 0.1; done; exit 7")
    p = nsvpn_lab.popen(["nsvpn", "exec", *opts, "--via", SOCKS, "--",
                         "sh", "-c", script], timeout=90)
    with p:
        nsvpn_lab.wait_for(lambda: os.path.exists(ready) or p.poll() is not None,
                           timeout=60, what="CMD to be ready")
        assert p.poll() is None, p.output()
        with open(f"/proc/{p.pid}/cmdline", "rb") as f:
            assert b"nsvpn" in f.read()  # ip netns exec and setpriv exec: p.pid is nsvpn
        os.kill(p.pid, signal.SIGUSR1)
        status = p.wait(30)
        out = p.output()
    assert status == 7, out  # CMD got its USR1 (the trap ran) and exited on its own
    with open(got) as f:
        assert f.read().split() == ["USR1"]  # delivered once, not twice
    if to_file:
        assert out == "", out  # quiet by default, and the dump went to the log file
        with open(log) as f:
            text = f.read()
    else:
        assert not os.path.exists(log)
        text = out
        assert len(text.splitlines()) == 1, text  # the dump is all there is on stderr
    m = re.search(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ .*counters (\{.*\})$", text, re.M)
    assert m, text
    d = json.loads(m.group(2))
    assert d["stack"]["tcp_flows_total"] >= 1
    assert d["stack"]["bytes_out"] >= 1048576  # the body went to the app through the stack
    assert d["upstreams"] == [{"name": d["upstreams"][0]["name"], "healthy": True}]
    assert "tun_write_errors" in d["relay"]
