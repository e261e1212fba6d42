"""nsvpn.vpnenv: openconnect's script environment -> VpnEnv (no I/O)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nsvpn.vpnenv import VpnEnvError, parse_vpn_env, relevant_env

# Captured from openconnect 9.01 --script-tun against the lab's ocserv 1.1.6 (user labuser).
FULL_TUNNEL = {
    "CISCO_CSTP_OPTIONS": "X-CSTP-Version=1",
    "CISCO_DEF_DOMAIN": "lab",
    "INTERNAL_IP4_ADDRESS": "10.77.0.130",
    "INTERNAL_IP4_DNS": "172.31.2.2",
    "INTERNAL_IP4_MTU": "1434",
    "INTERNAL_IP4_NETADDR": "10.77.0.0",
    "INTERNAL_IP4_NETMASK": "255.255.255.0",
    "INTERNAL_IP4_NETMASKLEN": "24",
    "VPNFD": "9",
    "VPNGATEWAY": "172.31.1.1",
    "VPNPID": "12101",
    "HOME": "/home/nsvpntest",
    "X-CSTP-MTU": "1434",
}
# Same server, user labsplit (per-user `route = 172.31.2.0/24`).
SPLIT = {
    "CISCO_DEF_DOMAIN": "lab",
    "CISCO_SPLIT_INC": "1",
    "CISCO_SPLIT_INC_0_ADDR": "172.31.2.0",
    "CISCO_SPLIT_INC_0_MASK": "255.255.255.0",
    "CISCO_SPLIT_INC_0_MASKLEN": "24",
    "INTERNAL_IP4_ADDRESS": "10.77.0.66",
    "INTERNAL_IP4_DNS": "172.31.2.2",
    "INTERNAL_IP4_MTU": "1434",
    "INTERNAL_IP4_NETADDR": "10.77.0.0",
    "INTERNAL_IP4_NETMASK": "255.255.255.0",
    "INTERNAL_IP4_NETMASKLEN": "24",
    "VPNGATEWAY": "172.31.1.1",
}


def test_full_tunnel_from_real_openconnect():
    e = parse_vpn_env(FULL_TUNNEL)
    assert (e.address4, e.prefixlen4, e.mtu, e.gateway) == ("10.77.0.130", 24, 1434, "172.31.1.1")
    assert e.dns4 == ["172.31.2.2"]
    assert e.default_domains == ["lab"]
    assert e.routes4() == ["0.0.0.0/0"]
    assert e.split_inc4 == [] and e.split_exc4 == []
    assert e.address6 is None and e.routes6() == []
    assert e.resolv_conf().splitlines()[1:] == ["nameserver 172.31.2.2", "search lab"]


def test_split_include_from_real_openconnect():
    e = parse_vpn_env(SPLIT)
    assert e.split_inc4 == ["172.31.2.0/24"]
    assert e.routes4() == ["172.31.2.0/24"]  # the DNS server is inside the included net


def test_split_include_adds_host_routes_for_uncovered_dns_servers():
    env = dict(SPLIT, INTERNAL_IP4_DNS="10.200.0.53 172.31.2.2 10.77.0.1")
    assert parse_vpn_env(env).routes4() == ["172.31.2.0/24", "10.200.0.53/32"]
    # no split list: the default route covers every server already
    env = dict(FULL_TUNNEL, INTERNAL_IP4_DNS="10.200.0.53")
    assert parse_vpn_env(env).routes4() == ["0.0.0.0/0"]


def test_relevant_env_drops_unrelated_variables():
    r = relevant_env(FULL_TUNNEL)
    assert "HOME" not in r and "VPNFD" not in r
    assert r["INTERNAL_IP4_ADDRESS"] == "10.77.0.130" and r["X-CSTP-MTU"] == "1434"
    assert r["VPNGATEWAY"] == "172.31.1.1"


def test_no_address_is_an_error():
    with pytest.raises(VpnEnvError, match="no IPv4 address"):
        parse_vpn_env({"VPNGATEWAY": "1.2.3.4"})
    with pytest.raises(VpnEnvError, match="'garbage'"):
        parse_vpn_env({"INTERNAL_IP4_ADDRESS": "garbage"})


def test_netmask_without_masklen_and_missing_mask():
    e = parse_vpn_env({"INTERNAL_IP4_ADDRESS": "10.1.2.3", "INTERNAL_IP4_NETMASK": "255.255.0.0"})
    assert e.prefixlen4 == 16
    e = parse_vpn_env({"INTERNAL_IP4_ADDRESS": "10.1.2.3", "INTERNAL_IP4_NETMASK": "255.0.255.0"})
    assert e.prefixlen4 == 32  # not contiguous: address alone
    e = parse_vpn_env({"INTERNAL_IP4_ADDRESS": "10.1.2.3"})
    assert e.prefixlen4 == 32 and e.mtu is None and e.link_mtu() == 1400


def test_bad_mtu_ignored():
    for bad in ("abc", "100", "70000", ""):
        e = parse_vpn_env({"INTERNAL_IP4_ADDRESS": "10.1.2.3", "INTERNAL_IP4_MTU": bad})
        assert e.mtu is None


def test_dns_lists_and_domains():
    e = parse_vpn_env({
        "INTERNAL_IP4_ADDRESS": "10.1.2.3",
        "INTERNAL_IP4_DNS": "10.0.0.1 10.0.0.2  bogus 10.0.0.1 fd00::1 10.0.0.3 10.0.0.4",
        "INTERNAL_IP6_DNS": "fd00::53",
        "CISCO_DEF_DOMAIN": "cern.ch, example.org",
        "CISCO_SPLIT_DNS": "corp.example,lab.example.",
    })
    assert e.dns4 == ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
    assert e.dns6 == ["fd00::53"]
    assert e.default_domains == ["cern.ch", "example.org"]
    assert e.split_dns == ["corp.example", "lab.example"]
    text = e.resolv_conf()
    assert text.count("nameserver") == 3  # glibc uses at most three
    assert "search cern.ch example.org" in text
    e = parse_vpn_env({"INTERNAL_IP4_ADDRESS": "10.1.2.3", "INTERNAL_IP4_DNS": "10.0.0.1",
                       "INTERNAL_IP6_DNS": "fd00::53"})
    assert "fd00::53" not in e.resolv_conf() and "fd00::53" in e.resolv_conf(ipv6=True)


def test_no_dns_pushed_names_no_resolver():
    text = parse_vpn_env({"INTERNAL_IP4_ADDRESS": "10.1.2.3"}).resolv_conf()
    assert "nameserver" not in text.replace("# the VPN server pushed no DNS server", "")
    for public in ("8.8.8.8", "1.1.1.1", "9.9.9.9"):
        assert public not in text


def test_split_lists_with_bad_entries():
    env = {
        "INTERNAL_IP4_ADDRESS": "10.77.0.5", "INTERNAL_IP4_NETMASKLEN": "24",
        "CISCO_SPLIT_INC": "5",
        "CISCO_SPLIT_INC_0_ADDR": "192.168.1.7", "CISCO_SPLIT_INC_0_MASKLEN": "24",
        "CISCO_SPLIT_INC_1_ADDR": "10.0.0.0", "CISCO_SPLIT_INC_1_MASK": "255.0.0.0",
        "CISCO_SPLIT_INC_2_ADDR": "nonsense", "CISCO_SPLIT_INC_2_MASKLEN": "8",
        "CISCO_SPLIT_INC_3_ADDR": "10.77.0.0", "CISCO_SPLIT_INC_3_MASKLEN": "24",
        # index 4 missing altogether
        "CISCO_SPLIT_EXC": "1",
        "CISCO_SPLIT_EXC_0_ADDR": "10.1.0.0", "CISCO_SPLIT_EXC_0_MASKLEN": "16",
        "CISCO_IPV6_SPLIT_INC": "2",
        "CISCO_IPV6_SPLIT_INC_0_ADDR": "2001:db8::", "CISCO_IPV6_SPLIT_INC_0_MASKLEN": "32",
        "CISCO_IPV6_SPLIT_INC_1_ADDR": "2001:db8::", "CISCO_IPV6_SPLIT_INC_1_MASKLEN": "999",
        "CISCO_IPV6_SPLIT_EXC": "1",
        "CISCO_IPV6_SPLIT_EXC_0_ADDR": "2001:db8:1::", "CISCO_IPV6_SPLIT_EXC_0_MASKLEN": "48",
    }
    e = parse_vpn_env(env)
    assert e.split_inc4 == ["192.168.1.0/24", "10.0.0.0/8", "10.77.0.0/24"]
    # the connected network is not added twice (the kernel refuses a duplicate route)
    assert e.routes4() == ["192.168.1.0/24", "10.0.0.0/8"]
    assert e.split_exc4 == ["10.1.0.0/16"]
    assert e.split_inc6 == ["2001:db8::/32"]
    assert e.split_exc6 == ["2001:db8:1::/48"]
    assert e.routes6() == []  # no IPv6 address: no IPv6 routes


def test_ipv6_address_forms():
    e = parse_vpn_env({"INTERNAL_IP4_ADDRESS": "10.0.0.2",
                       "INTERNAL_IP6_ADDRESS": "fd01::5", "INTERNAL_IP6_NETMASK": "fd01::/64"})
    assert (e.address6, e.prefixlen6) == ("fd01::5", 64)
    assert e.routes6() == ["::/0"]
    e = parse_vpn_env({"INTERNAL_IP4_ADDRESS": "10.0.0.2", "INTERNAL_IP6_NETMASK": "fd01::7/128"})
    assert (e.address6, e.prefixlen6) == ("fd01::7", 128)
    e = parse_vpn_env({"INTERNAL_IP4_ADDRESS": "10.0.0.2", "INTERNAL_IP6_ADDRESS": "fd01::9"})
    assert (e.address6, e.prefixlen6) == ("fd01::9", 128)


@given(st.dictionaries(st.sampled_from([
    "INTERNAL_IP4_NETMASK", "INTERNAL_IP4_NETMASKLEN", "INTERNAL_IP4_MTU", "INTERNAL_IP4_DNS",
    "INTERNAL_IP6_ADDRESS", "INTERNAL_IP6_NETMASK", "CISCO_DEF_DOMAIN", "CISCO_SPLIT_INC",
    "CISCO_SPLIT_INC_0_ADDR", "CISCO_SPLIT_INC_0_MASK", "CISCO_SPLIT_INC_0_MASKLEN",
    "CISCO_IPV6_SPLIT_INC", "CISCO_IPV6_SPLIT_INC_0_ADDR", "CISCO_IPV6_SPLIT_INC_0_MASKLEN",
]), st.text(max_size=40)))
def test_arbitrary_values_never_crash(extra):
    env = dict(extra, INTERNAL_IP4_ADDRESS="10.9.8.7")
    e = parse_vpn_env(env)
    assert 0 <= e.prefixlen4 <= 32
    for r in e.routes4():
        ipaddress.IPv4Network(r)
    for r in e.routes6():
        ipaddress.IPv6Network(r)
    assert e.resolv_conf().endswith("\n")
