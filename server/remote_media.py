"""Fetching `http(s)://` media without letting a client reach private networks (SSRF).

A client chooses the URL, so the server must not become its proxy into the operator's
network. The host must be on the operator's allowlist, and every address it resolves to must
be public. The name is resolved exactly once and the connection goes to an address that was
checked: letting httpx resolve the name again would let a DNS server answer a public address
to the check and a private one to the connection (DNS rebinding). The request still carries
the original host name in the `Host` header and, for HTTPS, in SNI and in certificate
verification, so virtual hosting and TLS work as if the name had been used.

The whole fetch (resolution, connection, headers and body) runs under one deadline: httpx's
timeouts bound each read, not their sum, so a server sending one byte a second would
otherwise hold a request (and its memory) for as long as it likes.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass

import httpx

from stts_vllm.media.errors import MediaError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]
AddressPolicy = Callable[[IPAddress], bool]


@dataclass(frozen=True)
class RemoteMedia:
    data: bytes
    mime: str | None  # the Content-Type's media type, lower case, without parameters


# -- which addresses count as public --

# Python's `is_global` is not enough on its own: in 3.11.7 it calls multicast (224.0.0.1,
# ff0e::1), site-local (fec0::/10), NAT64 (64:ff9b::/96), 6to4 (2002::/16) and
# IPv4-compatible (::a.b.c.d) addresses global, and its tables change between patch releases.
# So these explicit tables (IANA's special-purpose registries) decide first, and `is_global`
# is only a second net.
_V4_REFUSED = [
    (ipaddress.IPv4Network(net), why)
    for net, why in [
        ("0.0.0.0/8", "'this network'"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared address space (carrier-grade NAT)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "6to4 relay anycast"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),  # holds 255.255.255.255 (broadcast) too
    ]
]

# Every public IPv6 address lies in 2000::/3 (global unicast), so everything outside it is
# refused; this table only names the reason (first match wins).
_V6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_V6_OUTSIDE = [
    (ipaddress.IPv6Network(net), why)
    for net, why in [
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "IPv4-compatible (deprecated)"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("fc00::/7", "unique local"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    ]
]
_V6_REFUSED = [  # inside 2000::/3 but not public
    (ipaddress.IPv6Network(net), why)
    for net, why in [
        # Teredo (2001::/32) is inside: its client address is obfuscated and NAT-mapped, so
        # where it lands cannot be judged; the rest are anycast protocol services.
        ("2001::/23", "IETF protocol assignments (Teredo among them)"),
        ("2001:db8::/32", "documentation"),
        # 6to4 (deprecated, RFC 7526): a relay chosen by routing decides where the embedded
        # IPv4 address is reached, possibly inside the relay's own network.
        ("2002::/16", "6to4"),
        ("3fff::/20", "documentation"),
    ]
]
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")


def refusal_reason(address: IPAddress) -> str | None:
    """Why `address` is not public, or None when it is.

    Two IPv6 forms carry an IPv4 address that the packet really goes to, and are judged by
    it: IPv4-mapped (::ffff:a.b.c.d, how a dual-stack socket names an IPv4 peer) and the
    NAT64 well-known prefix (64:ff9b::a.b.c.d, what DNS64 answers on IPv6-only networks, so
    refusing it would cut such deployments off from every IPv4-only host). Every other
    translation form (6to4, Teredo, IPv4-compatible, the local-use NAT64 prefix) is refused
    outright: they are deprecated or local, and no media host needs them.
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped
        if embedded is None and address in _NAT64_WELL_KNOWN:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            reason = refusal_reason(embedded)
            return None if reason is None else f"embeds a non-public IPv4 address: {reason}"
        if address.scope_id is not None:
            return "has a zone id (local scope)"
        if address not in _V6_GLOBAL_UNICAST:
            return _first(_V6_OUTSIDE, address) or "outside global unicast (2000::/3)"
        why = _first(_V6_REFUSED, address)
    else:
        why = _first(_V4_REFUSED, address)
    if why is not None:
        return why
    if not address.is_global or address.is_multicast:
        return "not globally reachable"
    return None


def _first(table: Sequence[tuple[IPNetwork, str]], address: IPAddress) -> str | None:
    return next((why for network, why in table if address in network), None)


def is_public(address: IPAddress) -> bool:
    """The production address policy: see `refusal_reason`."""
    return refusal_reason(address) is None


def check_public_address(address: str) -> None:
    """Raise MediaError("forbidden_url") unless `address` (an IP literal) is public."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError as exc:
        raise MediaError("forbidden_url", f"{address!r} is not an IP address") from exc
    reason = refusal_reason(parsed)
    if reason is not None:
        raise MediaError("forbidden_url", f"{address} is not a public address ({reason})")


# -- fetching --


async def resolve(host: str, port: int) -> list[str]:
    """The host's addresses in the system's preferred order, resolved off the event loop."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@functools.cache
def _default_ssl_context() -> ssl.SSLContext:
    """httpx's own default (certifi, or SSL_CERT_FILE/SSL_CERT_DIR), built once: the client
    below sets trust_env=False to ignore proxy variables, which would also drop these."""
    return httpx.create_ssl_context(trust_env=True)


async def fetch_remote(
    url: str,
    *,
    allowlist: Collection[str],
    max_bytes: int,
    deadline_seconds: float,
    resolver: Resolver | None = None,
    is_allowed_address: AddressPolicy = is_public,
    ssl_context: ssl.SSLContext | None = None,
) -> RemoteMedia:
    """GET `url` (http or https) from an allowlisted host at a checked public address.

    `resolver` and `is_allowed_address` exist for tests (a name mapped to a loopback server);
    production keeps the defaults. `ssl_context` replaces the default trust store (a private
    CA). Raises MediaError: forbidden_url (host not allowlisted, or any of its addresses not
    allowed), unresolvable_host, fetch_failed (connection, TLS, non-200 status, redirect,
    encoded body), fetch_timeout (the deadline passed) and media_too_large (413).
    """
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise MediaError("unsupported_url", f"malformed media URL ({exc})") from exc
    if parsed.scheme not in ("http", "https"):
        raise MediaError("unsupported_url", "remote media URLs must be http(s)")
    host = parsed.host  # lower case, IDNA decoded, IPv6 without brackets
    ascii_host = parsed.raw_host.decode("ascii")  # IDNA encoded: what DNS and SNI take
    allowed = {entry.strip().lower() for entry in allowlist}
    if not host or (host not in allowed and ascii_host not in allowed):
        raise MediaError("forbidden_url", f"remote media from {host!r} is not allowed")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        async with asyncio.timeout(deadline_seconds):
            addresses = await _resolve_checked(
                ascii_host, port, resolver or resolve, is_allowed_address
            )
            return await _fetch_first(parsed, addresses, max_bytes, deadline_seconds, ssl_context)
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise MediaError(
            "fetch_timeout",
            f"fetching media from {host!r} did not finish within the {deadline_seconds:g} s limit",
        ) from exc


async def _resolve_checked(
    host: str, port: int, resolver: Resolver, is_allowed_address: AddressPolicy
) -> list[IPAddress]:
    """Resolve once; refuse the host if any address is not allowed, not just the first:
    which one gets used is not ours to pick (fallback below), and a name that also points
    inside is not a public host."""
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        try:
            names = await resolver(host, port)
            addresses = [ipaddress.ip_address(name) for name in names]
        except (OSError, ValueError) as exc:
            raise MediaError("unresolvable_host", f"cannot resolve {host!r}") from exc
        if not addresses:
            raise MediaError("unresolvable_host", f"cannot resolve {host!r}")
    if not all(is_allowed_address(address) for address in addresses):
        # The addresses stay out of the message: they describe the operator's network.
        raise MediaError("forbidden_url", f"{host!r} resolves to a non-public address")
    return addresses


async def _fetch_first(
    url: httpx.URL,
    addresses: list[IPAddress],
    max_bytes: int,
    deadline_seconds: float,
    ssl_context: ssl.SSLContext | None,
) -> RemoteMedia:
    """Try the checked addresses in order until one connects, as a client given the name
    would (a dual-stack host's IPv6 address first on a machine without IPv6 must still work).
    Only connection failures move on: once a request is sent, its answer is final."""
    headers = {
        "Host": url.netloc.decode("ascii"),  # host[:port] as the client wrote it, IDNA encoded
        # Video does not compress, and an encoded body would be decompressed chunk by chunk
        # without bound (a few KiB of gzip can inflate to many MiB): ask for it as stored.
        "Accept-Encoding": "identity",
    }
    extensions = {"sni_hostname": url.raw_host.decode("ascii")}
    failure: httpx.TransportError | None = None
    # Per operation; the caller's asyncio.timeout bounds the sum. Each address gets its share
    # of the deadline to connect, so one that drops packets leaves time to try the next.
    timeout = httpx.Timeout(deadline_seconds, connect=deadline_seconds / len(addresses))
    # One client per fetch: its pool is keyed by (scheme, address, port), so a shared one
    # could reuse a connection made for another host name (and another certificate).
    async with httpx.AsyncClient(
        timeout=timeout,
        follow_redirects=False,  # a redirect could point anywhere, past every check above
        trust_env=False,  # a proxy from the environment would resolve the name itself
        verify=ssl_context or _default_ssl_context(),
    ) as client:
        for address in addresses:
            target = url.copy_with(host=str(address))  # httpx brackets IPv6 literals
            try:
                return await _get(client, target, headers, extensions, max_bytes)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                failure = exc  # refused, unreachable, silent, or the TLS handshake failed
    raise MediaError("fetch_failed", f"cannot connect to {url.host!r} ({failure})")


async def _get(
    client: httpx.AsyncClient,
    target: httpx.URL,
    headers: dict[str, str],
    extensions: dict[str, str],
    max_bytes: int,
) -> RemoteMedia:
    try:
        async with client.stream("GET", target, headers=headers, extensions=extensions) as reply:
            if reply.is_redirect:
                raise MediaError(
                    "fetch_failed",
                    f"fetching media gave HTTP {reply.status_code} (redirects are not followed)",
                )
            if reply.status_code != 200:
                raise MediaError("fetch_failed", f"fetching media gave HTTP {reply.status_code}")
            encoding = reply.headers.get("content-encoding", "identity").strip().lower()
            if encoding != "identity":
                raise MediaError(
                    "fetch_failed", f"media came with Content-Encoding {encoding!r} (not asked)"
                )
            too_large = MediaError("media_too_large", f"media exceeds {max_bytes} bytes", 413)
            declared = reply.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise too_large
            buffer = bytearray()
            async for chunk in reply.aiter_raw():
                buffer.extend(chunk)
                if len(buffer) > max_bytes:
                    raise too_large
    except (httpx.ConnectError, httpx.TimeoutException):
        raise  # the caller tries the next address, or reports the deadline
    except httpx.HTTPError as exc:
        raise MediaError("fetch_failed", f"fetching media failed ({exc})") from exc
    mime = reply.headers.get("content-type", "").split(";")[0].strip().lower() or None
    return RemoteMedia(bytes(buffer), mime)
