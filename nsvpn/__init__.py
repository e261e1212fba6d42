"""nsvpn: a user-level VPN for network-secluded compute nodes."""

__version__ = "0.1.0"
