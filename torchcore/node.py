"""Node identity: the addresses and hostname a task file's ``ips``/``hosts`` are matched against.

A node normally knows its addresses from its interfaces (IPv4 and IPv6, via
psutil). ``--node-ip`` (repeatable) or ``$TORCHCORE_NODE_IP`` (comma-separated)
replace them: behind NAT, in tests, or to ask "what would run on that machine".
``$TORCHCORE_NODE_HOSTNAME`` likewise replaces the hostname.
"""

import ipaddress
import os
import socket
from dataclasses import dataclass

from torchcore.errors import TorchcoreError

ENV_IPS = "TORCHCORE_NODE_IP"
ENV_HOSTNAME = "TORCHCORE_NODE_HOSTNAME"


@dataclass(frozen=True)
class Node:
    """One machine as the task file sees it: its addresses (ipaddress objects) and hostname."""

    addresses: tuple
    hostname: str

    @classmethod
    def detect(cls, override=None, hostname=None):
        """Return this node: ``override`` (strings from ``--node-ip``), else ``$TORCHCORE_NODE_IP``,
        else every address of every interface. Raises TorchcoreError naming a bad address.
        """
        if override:
            addresses = parse_addresses(override, "--node-ip")
        elif os.environ.get(ENV_IPS, "").strip():
            addresses = parse_addresses([os.environ[ENV_IPS]], ENV_IPS)
        else:
            addresses = interface_addresses()
        name = hostname or os.environ.get(ENV_HOSTNAME, "").strip() or socket.gethostname()
        return cls(addresses=addresses, hostname=name)

    def describe(self):
        """``host (10.0.0.5, fe80::1)`` for messages and headers."""
        return f"{self.hostname} ({', '.join(str(a) for a in self.addresses) or 'no address'})"


def parse_addresses(values, source):
    """Parse strings that may each hold several comma-separated addresses.

    >>> parse_addresses(["10.0.0.5, ::1"], "--node-ip")
    (IPv4Address('10.0.0.5'), IPv6Address('::1'))
    """
    found = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            try:
                address = ipaddress.ip_address(item)
            except ValueError:
                raise TorchcoreError(
                    f"{source}: {item!r} is not an IPv4 or IPv6 address "
                    "(expected e.g. 10.0.0.5 or 2001:db8::5; networks are not node addresses)") from None
            if address not in found:
                found.append(address)
    if not found:
        raise TorchcoreError(f"{source}: no address given")
    return tuple(found)


def interface_addresses():
    """Every IPv4 and IPv6 address of every interface, loopback included, scope ids dropped."""
    import psutil  # imported here: only nodes that detect need it

    found = []
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                address = ipaddress.ip_address(entry.address.split("%", 1)[0])
            except ValueError:
                continue
            if address not in found:
                found.append(address)
    return tuple(found)
