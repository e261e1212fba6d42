from nsvpn.routing import DIRECT, DNS, REFUSE, UNREACHABLE, UPSTREAM, Decision, Router


def make(**kw):
    fakes = {"198.18.0.5": "remote.lab"}
    return Router(direct=["172.31.1.0/24"], fake_ip_lookup=fakes.get, **kw)


def test_gateway_is_refused_unless_host_loopback_allowed():
    assert make().decide("10.0.2.2", 80) == Decision(REFUSE)
    assert make(allow_host_loopback=True).decide("10.0.2.2", 8080) == Decision(
        DIRECT, "127.0.0.1", 8080)


def test_dns_address_only_serves_port_53():
    assert make().decide("10.0.2.3", 53).action == DNS
    assert make().decide("10.0.2.3", 80).action == REFUSE


def test_rest_of_namespace_subnet_is_unreachable():
    assert make().decide("10.0.2.77", 80).action == UNREACHABLE


def test_fake_ip_connects_by_name():
    assert make().decide("198.18.0.5", 1094) == Decision(UPSTREAM, "remote.lab", 1094)
    # an unknown address in the fake range is an ordinary address
    assert make().decide("198.18.0.6", 80) == Decision(UPSTREAM, "198.18.0.6", 80)


def test_direct_networks_and_default_upstream():
    assert make().decide("172.31.1.1", 8080) == Decision(DIRECT, "172.31.1.1", 8080)
    assert make().decide("172.31.2.2", 80) == Decision(UPSTREAM, "172.31.2.2", 80)
    assert make().decide("2001:db8::1", 443) == Decision(UPSTREAM, "2001:db8::1", 443)


def test_multicast_and_broadcast_go_nowhere():
    assert make().decide("224.0.0.1", 5353).action == UNREACHABLE
    assert make().decide("255.255.255.255", 67).action == UNREACHABLE


def test_ipv6_namespace_addresses():
    r = make(namespace_net6="fd00::/64", gateway6="fd00::2", dns6="fd00::3")
    assert r.decide("fd00::2", 80).action == REFUSE
    assert r.decide("fd00::3", 53).action == REFUSE
    assert r.decide("fd00::77", 80).action == UNREACHABLE
    assert r.decide("ff02::fb", 5353, "udp").action == UNREACHABLE
    assert r.decide("fd31:2::2", 80) == Decision(UPSTREAM, "fd31:2::2", 80)
    assert make().decide("fd00::77", 80).action == UPSTREAM  # no IPv6 namespace net given
