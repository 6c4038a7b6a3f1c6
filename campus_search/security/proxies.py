"""Trusted reverse proxies: who really sent a request, and whether its proxy headers may be believed.

``TRUSTED_PROXIES`` lists the addresses (IPs or CIDRs) of the proxies in front of the service: nginx,
a load balancer, a Shibboleth or OIDC proxy. Headers that a client could forge -- ``X-Forwarded-For``
and the identity headers of ``security/auth.py`` -- count only when the TCP peer is one of them.
Nothing is trusted by default.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=8)
def parse_networks(entries: tuple[str, ...]) -> tuple[Network, ...]:
    """``("10.0.0.0/8", "127.0.0.1")`` -> networks. ValueError names a bad entry."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or CIDR network") from None
    return tuple(networks)


def _address(value: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not value:
        return None
    value = value.strip()
    if value.startswith("[") and "]" in value:  # "[2001:db8::1]:443"
        value = value[1:value.index("]")]
    elif value.count(":") == 1:  # "192.0.2.1:443"
        value = value.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:10.0.0.1 from dual-stack sockets
    return mapped or address


def is_trusted(address: str | None, trusted: Iterable[str]) -> bool:
    """Whether ``address`` lies in one of the ``trusted`` networks."""
    ip = _address(address)
    if ip is None:
        return False
    return any(ip.version == net.version and ip in net for net in parse_networks(tuple(trusted)))


def from_trusted_proxy(request: Any, settings: Any) -> bool:
    """True when the request's TCP peer is a configured trusted proxy."""
    return bool(settings.trusted_proxies) and is_trusted(request.remote_addr, settings.trusted_proxies)


def from_identity_proxy(request: Any, settings: Any) -> bool:
    """True when the request's TCP peer is a configured identity (SAML/OIDC) proxy."""
    return bool(settings.identity_proxies) and is_trusted(request.remote_addr, settings.identity_proxies)


def client_ip(request: Any, settings: Any) -> str | None:
    """The client's address: the TCP peer, unless that is a trusted proxy, in which case the
    right-most ``X-Forwarded-For`` entry that is not itself a trusted proxy (entries further left
    were written by the client and prove nothing)."""
    peer = request.remote_addr
    if not from_trusted_proxy(request, settings):
        return peer
    hops = [h.strip() for h in ",".join(request.headers.getlist("X-Forwarded-For")).split(",") if h.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop, settings.trusted_proxies):
            ip = _address(hop)
            return str(ip) if ip is not None else peer
    return str(_address(hops[0])) if hops and _address(hops[0]) else peer
