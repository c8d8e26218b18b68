"""Which worker a new TCP connection goes to: on a TLS listener that clients
reach directly, the same one for the same client address, so that a client
that reconnects (a page load, a WebSocket reconnecting on a mobile network)
resumes its TLS session; elsewhere, by client address and port, so that the
connections spread over the workers.

Each worker has its own ``SO_REUSEPORT`` socket for a listener (see
:mod:`chatproxy.process.sharing`); by default the kernel picks one by a hash
of the connection's addresses *and ports*, so a client's reconnects land on
any worker, and a worker never saw the session the client resumes (each
worker's session cache is its own, and pyOpenSSL offers no way to share
session-ticket keys: see docs/architecture.md, "TLS").  A classic BPF
program attached to the listener's reuseport group (``SO_ATTACH_REUSEPORT_CBPF``,
Linux 4.5+) picks instead by a hash of the client's IP address alone.
Clients behind one NAT address share a worker.

Steering by address alone is wrong where the kernel sees one address for
everyone: behind a load balancer that passes the client's address in a PROXY
header (a ``haproxy:`` endpoint), every connection comes from the balancer and
would land on one worker; and a listener without TLS has no session to
resume.  Those listeners get the program with ``client_ports``: the client's
port joins the hash, and each connection goes its own way (still only to the
sockets of the current workers, which the kernel's own hash would not
guarantee while a reload retires some).

The program reads the client address from the IP header (version 4: the
source address; version 6: the four words of the source address, XORed; with
``client_ports``, XORed with the TCP source port, found after the IPv4
header's own length or the fixed IPv6 header), multiplies by a 32-bit odd
constant (Fibonacci hashing) and returns ``hash % workers``: the index of a
socket in the group, which is the order the master bound them in (worker 1
first).
"""

from __future__ import annotations

import ctypes
import socket
import struct

__all__ = ["SO_ATTACH_REUSEPORT_CBPF", "attach", "program", "worker_for"]

#: <asm-generic/socket.h>
SO_ATTACH_REUSEPORT_CBPF = 51

# <linux/filter.h>: instruction classes, sizes, modes, operations.
_LD, _LDX, _ALU, _JMP, _RET, _MISC = 0x00, 0x01, 0x04, 0x05, 0x06, 0x07
_W, _H, _B = 0x00, 0x08, 0x10
_ABS, _IND, _MSH = 0x20, 0x40, 0xA0
_MUL, _RSH, _MOD, _XOR = 0x20, 0x70, 0x90, 0xA0
_K, _X = 0x00, 0x08
_JA, _JEQ = 0x00, 0x10
_A = 0x10
_TAX = 0x00
#: Offsets from the start of the network (IP) header.
_NET = -0x100000
#: The length of an IPv6 header without extension headers (a SYN has none;
#: one that had some would just be hashed on other bytes).
_IPV6_HEADER = 40
#: The multiplier (2^32 divided by the golden ratio, odd).
_GOLDEN = 0x9E3779B1

Instruction = tuple[int, int, int, int]  # code, jump if true, jump if false, k


def program(workers: int, client_ports: bool = False) -> list[Instruction]:
    """The BPF program that maps a client address (and, with ``client_ports``,
    its port) to a socket index in ``range(workers)``."""
    if workers < 1:
        raise ValueError("at least one worker")
    ipv4: list[Instruction] = [(_LD | _W | _ABS, 0, 0, _NET + 12)]  # A = IPv4 source address
    ipv6: list[Instruction] = [
        (_LD | _W | _ABS, 0, 0, _NET + 8),          # IPv6 source address, word 1
        (_MISC | _TAX, 0, 0, 0),                    # X = A
        (_LD | _W | _ABS, 0, 0, _NET + 12),         # word 2
        (_ALU | _XOR | _X, 0, 0, 0),
        (_MISC | _TAX, 0, 0, 0),
        (_LD | _W | _ABS, 0, 0, _NET + 16),         # word 3 (word 4 next)
        (_ALU | _XOR | _X, 0, 0, 0),
        (_MISC | _TAX, 0, 0, 0),
        (_LD | _W | _ABS, 0, 0, _NET + 20),
        (_ALU | _XOR | _X, 0, 0, 0),
    ]
    if client_ports:
        ipv4 = [
            (_LDX | _B | _MSH, 0, 0, _NET + 0),     # X = the IPv4 header's length
            (_LD | _H | _IND, 0, 0, _NET + 0),      # A = TCP source port, just after it
            (_MISC | _TAX, 0, 0, 0),                # X = A
            *ipv4,
            (_ALU | _XOR | _X, 0, 0, 0),
        ]
        ipv6 = [
            *ipv6,
            (_MISC | _TAX, 0, 0, 0),
            (_LD | _H | _ABS, 0, 0, _NET + _IPV6_HEADER),  # TCP source port
            (_ALU | _XOR | _X, 0, 0, 0),
        ]
    return [
        (_LD | _B | _ABS, 0, 0, _NET + 0),          # A = first byte of the IP header
        (_ALU | _RSH | _K, 0, 0, 4),                # A = IP version
        (_JMP | _JEQ | _K, 0, len(ipv4) + 1, 4),    # IPv4: next; else skip to IPv6
        *ipv4,
        (_JMP | _JA, 0, 0, len(ipv6)),              # to the hash
        *ipv6,
        (_ALU | _MUL | _K, 0, 0, _GOLDEN),          # hash: spread neighbouring addresses
        (_ALU | _RSH | _K, 0, 0, 16),
        (_ALU | _MOD | _K, 0, 0, workers),
        (_RET | _A, 0, 0, 0),
    ]


def worker_for(address: str, workers: int, port: int | None = None) -> int:
    """The socket index (0-based worker) the program picks for a client
    address (and source ``port``, for the program with ``client_ports``):
    the same computation in Python, for tests and logs."""
    packed = socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
    if len(packed) == 4:
        word = int.from_bytes(packed, "big")
    else:
        words = struct.unpack("!4I", packed)
        word = words[0] ^ words[1] ^ words[2] ^ words[3]
    if port is not None:
        word ^= port
    return (((word * _GOLDEN) & 0xFFFFFFFF) >> 16) % workers


def attach(sock: socket.socket, workers: int, client_ports: bool = False) -> None:
    """Attach the program for ``workers`` sockets (steering by address, or by
    address and port with ``client_ports``) to ``sock``'s reuseport group,
    replacing any program attached before.  Raises OSError where the kernel
    refuses (not Linux, no reuseport group)."""
    instructions = program(workers, client_ports)
    filters = (ctypes.c_ubyte * (8 * len(instructions))).from_buffer_copy(
        b"".join(struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF) for code, jt, jf, k in instructions))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF,
                    bytes(_SockFprog(len(instructions), ctypes.addressof(filters))))


class _SockFprog(ctypes.Structure):
    """``struct sock_fprog`` of <linux/filter.h>."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
