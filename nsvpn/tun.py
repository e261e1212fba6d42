"""Raw TUN device ioctls (no python-pytun: its fd is not close-on-exec and it hides offloads).

`open_tun()` must run in the network namespace the device should live in (the kernel creates
the interface in the netns of the process doing TUNSETIFF); the returned fd may then be passed
to a process in any other netns and keeps working there.

With `vnet_hdr=True` every packet read from or written to the fd is prefixed by a 10-byte
`struct virtio_net_hdr` (see `VnetHdr`). We enable checksum and TSO offloads, so the kernel
may hand us TCP segments up to 64 KiB with a partial checksum (`VNET_F_NEEDS_CSUM`: only the
pseudo-header sum is filled in) regardless of the MTU; the reader must segment/checksum
accordingly or simply treat the payload as one big segment (a userspace stack can). Packets we
write may carry `gso_type = GSO_NONE` and a complete checksum.
"""

from __future__ import annotations

import errno as _errno
import fcntl
import os
import struct
from typing import NamedTuple

TUN_PATH = "/dev/net/tun"

# <linux/if_tun.h>; _IOW('T', nr, int) = 0x40045400 | nr on every Linux ABI we run on.
TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8

IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08

IFNAMSIZ = 16

# struct virtio_net_hdr (legacy, little-endian on the architectures we support).
VNET_HDR_LEN = 10
VNET_F_NEEDS_CSUM = 1
VNET_F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_ECN = 0x80
_VNET = struct.Struct("<BBHHHH")

# A VNET header meaning "nothing special": what we prepend to packets we write.
VNET_HDR_PLAIN = bytes(VNET_HDR_LEN)


class VnetHdr(NamedTuple):
    flags: int
    gso_type: int
    hdr_len: int
    gso_size: int
    csum_start: int
    csum_offset: int

    @classmethod
    def parse(cls, buf: bytes) -> VnetHdr:
        return cls(*_VNET.unpack_from(buf, 0))

    def pack(self) -> bytes:
        return _VNET.pack(*self)


class TunError(OSError):
    """Opening or configuring the TUN device failed; str() explains which step and why."""


def _ifreq(name: str, flags: int) -> bytes:
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ:
        raise ValueError(f"bad interface name {name!r} (1..{IFNAMSIZ - 1} bytes)")
    # struct ifreq: char ifr_name[16]; union { short ifr_flags; ... } (24 bytes)
    return struct.pack("16sH22x", raw, flags)


def open_tun(name: str = "tun0", *, vnet_hdr: bool = False) -> int:
    """Create (or attach to) TUN interface `name` in the current netns; return its fd.

    The fd is O_CLOEXEC and blocking; the interface is created down and unconfigured. Raises
    TunError (an OSError carrying errno) naming the failing step.
    """
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise TunError(e.errno, f"open {TUN_PATH}: {os.strerror(e.errno)}{_mode_hint(e)}") from e
    try:
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        _ioctl(fd, TUNSETIFF, _ifreq(name, flags), f"TUNSETIFF {name}")
        if vnet_hdr:
            _ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN), "TUNSETVNETHDRSZ")
            # TSO needs CSUM; ECN lets the kernel keep CWR on super-segments instead of
            # splitting them in software.
            offload = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
            _ioctl(fd, TUNSETOFFLOAD, offload, "TUNSETOFFLOAD")
    except BaseException:
        os.close(fd)
        raise
    return fd


def tun_name(fd: int) -> str:
    """The interface name a TUN fd is attached to (TUNGETIFF)."""
    buf = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
    return buf[:IFNAMSIZ].split(b"\0", 1)[0].decode()


def _ioctl(fd: int, req: int, arg, what: str) -> None:
    try:
        fcntl.ioctl(fd, req, arg)
    except OSError as e:
        hint = ""
        if e.errno == _errno.EPERM:
            hint = " (needs CAP_NET_ADMIN in the owner user namespace of this network namespace)"
        elif e.errno == _errno.EBUSY:
            hint = " (an interface of that name exists with other flags)"
        raise TunError(e.errno, f"{what}: {os.strerror(e.errno)}{hint}") from e


def _mode_hint(e: OSError) -> str:
    if e.errno == _errno.ENOENT:
        return " (no TUN device node; the tun kernel module may not be loaded)"
    if e.errno in (_errno.EACCES, _errno.EPERM):
        mode = device_mode()
        return f" (device mode {mode}; unprivileged use needs 0666)" if mode else ""
    return ""


def device_mode() -> str | None:
    """Permission bits of /dev/net/tun as '0666', or None when it is missing."""
    try:
        return f"{os.stat(TUN_PATH).st_mode & 0o7777:04o}"
    except OSError:
        return None
