"""Remote media fetching (server.remote_media) against loopback servers started in each test.

The name `media.example` never resolves for real (.example is reserved), so a request that
reaches a server proves the connection went to the address the injected resolver answered,
which the address policy checked, and not to a second lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from server.remote_media import (
    IPAddress,
    RemoteMedia,
    check_public_address,
    fetch_remote,
    is_public,
    resolve,
)
from stts_vllm.media.errors import MediaError

HOST = "media.example"
Reply = Callable[[asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Seen:
    """What a loopback server saw: one entry per request."""

    targets: list[str] = field(default_factory=list)  # request target (path and query)
    headers: list[dict[str, str]] = field(default_factory=list)  # names in lower case
    local: list[str] = field(default_factory=list)  # the address the client connected to
    sni: list[str | None] = field(default_factory=list)


def respond(status: str, headers: dict[str, str], body: bytes = b"") -> Reply:
    async def reply(writer: asyncio.StreamWriter) -> None:
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        writer.write(f"HTTP/1.1 {status}\r\n{head}Connection: close\r\n\r\n".encode() + body)
        await writer.drain()

    return reply


def ok(body: bytes, content_type: str = "video/mp4") -> Reply:
    return respond("200 OK", {"Content-Type": content_type, "Content-Length": str(len(body))}, body)


@contextlib.asynccontextmanager
async def serving(
    reply: Reply, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[int, Seen]]:
    seen = Seen()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            seen.targets.append(head[0].split(" ")[1])
            seen.headers.append(
                {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
            )
            seen.local.append(writer.get_extra_info("sockname")[0])
            ssl_object = writer.get_extra_info("ssl_object")
            seen.sni.append(None if ssl_object is None else ssl_object.server_hostname)
            await reply(writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away (a deadline, a refused certificate): expected here
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, 0, ssl=tls)
    async with server:
        yield server.sockets[0].getsockname()[1], seen


class Resolver:
    """Answers from a script, one answer per call, and counts the calls."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        return self.answers.pop(0)


def loopback_only(address: IPAddress) -> bool:
    return address.is_loopback


async def fetch(url: str, resolver: Any, **kwargs: Any) -> RemoteMedia:
    options: dict[str, Any] = {
        "allowlist": [HOST],
        "max_bytes": 1024,
        "deadline_seconds": 5.0,
        "is_allowed_address": loopback_only,
    }
    return await fetch_remote(url, resolver=resolver, **(options | kwargs))


def media_error(coroutine: Awaitable[object]) -> MediaError:
    async def run() -> None:
        await coroutine

    with pytest.raises(MediaError) as caught:
        asyncio.run(run())
    return caught.value


# -- the happy path, and where the connection goes --


def test_fetch_connects_to_the_checked_address_with_the_original_host() -> None:
    resolver = Resolver(["127.0.0.2"], ["10.0.0.1"])  # a second lookup would get 10.0.0.1

    async def run() -> tuple[RemoteMedia, Seen, int]:
        async with serving(ok(b"video bytes", "Video/MP4; codecs=avc1"), "127.0.0.2") as (
            port,
            seen,
        ):
            media = await fetch(f"http://{HOST}:{port}/clip.mp4?t=1", resolver)
            return media, seen, port

    media, seen, port = asyncio.run(run())
    assert media == RemoteMedia(b"video bytes", "video/mp4")
    assert resolver.calls == [(HOST, port)]  # resolved once, by fetch_remote only
    assert seen.local == ["127.0.0.2"]  # the checked address, not a lookup by httpx
    assert seen.targets == ["/clip.mp4?t=1"]
    assert seen.headers[0]["host"] == f"{HOST}:{port}"
    assert seen.headers[0]["accept-encoding"] == "identity"


def test_ipv6_address_is_bracketed_in_the_request() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    resolver = Resolver(["::1"])

    async def run() -> tuple[RemoteMedia, Seen, int]:
        async with serving(ok(b"six"), "::1") as (port, seen):
            return await fetch(f"http://{HOST}:{port}/v", resolver), seen, port

    media, seen, port = asyncio.run(run())
    assert media.data == b"six"
    assert seen.local == ["::1"]
    assert seen.headers[0]["host"] == f"{HOST}:{port}"


def test_an_address_that_refuses_the_connection_falls_through_to_the_next() -> None:
    async def run() -> tuple[RemoteMedia, Seen]:
        async with serving(ok(b"second"), "127.0.0.2") as (port, seen):
            resolver = Resolver(["127.0.0.3", "127.0.0.2"])  # nothing listens on .3
            return await fetch(f"http://{HOST}:{port}/", resolver), seen

    media, seen = asyncio.run(run())
    assert media.data == b"second"
    assert seen.local == ["127.0.0.2"]


def test_connection_failure_on_every_address_is_fetch_failed() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    error = media_error(fetch(f"http://{HOST}:{port}/", Resolver(["127.0.0.1"])))
    assert (error.code, error.status) == ("fetch_failed", 400)


# -- what is refused before any connection --


def test_host_not_in_the_allowlist_is_forbidden_without_resolving() -> None:
    resolver = Resolver(["127.0.0.1"])
    error = media_error(fetch("http://elsewhere.example/v.mp4", resolver))
    assert (error.code, error.status) == ("forbidden_url", 400)
    assert resolver.calls == []


def test_every_resolved_address_is_checked_not_just_the_first() -> None:
    async def run() -> tuple[MediaError, Seen]:
        async with serving(ok(b"x")) as (port, seen):
            resolver = Resolver(["127.0.0.1", "10.0.0.1"])
            with pytest.raises(MediaError) as caught:
                await fetch(f"http://{HOST}:{port}/", resolver)
            return caught.value, seen

    error, seen = asyncio.run(run())
    assert error.code == "forbidden_url"
    assert "10.0.0.1" not in error.message  # the operator's network stays private
    assert seen.targets == []  # refused before connecting


def test_the_production_policy_refuses_loopback() -> None:
    async def run() -> tuple[MediaError, Seen]:
        async with serving(ok(b"x")) as (port, seen):
            url = f"http://{HOST}:{port}/"
            with pytest.raises(MediaError) as caught:
                await fetch(url, Resolver(["127.0.0.1"]), is_allowed_address=is_public)
            return caught.value, seen

    error, seen = asyncio.run(run())
    assert error.code == "forbidden_url"
    assert seen.targets == []


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://127.0.0.1/v", "127.0.0.1"),
        ("http://[::ffff:127.0.0.1]/v", "::ffff:127.0.0.1"),
        ("http://[::1]:8080/v", "::1"),
    ],
)
def test_ip_literal_hosts_are_checked_without_a_resolver(url: str, host: str) -> None:
    resolver = Resolver()
    allowlist = [host]  # allowlisted, and still refused: the address decides
    error = media_error(
        fetch_remote(
            url, allowlist=allowlist, max_bytes=10, deadline_seconds=5.0, resolver=resolver
        )
    )
    assert error.code == "forbidden_url"
    assert resolver.calls == []


def test_default_resolver_answers_unique_addresses() -> None:
    # A literal needs no DNS; getaddrinfo would list it once per socket type unfiltered.
    assert asyncio.run(resolve("127.0.0.1", 80)) == ["127.0.0.1"]


def test_unresolvable_host() -> None:
    async def fails(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    assert media_error(fetch(f"http://{HOST}/", fails)).code == "unresolvable_host"
    assert media_error(fetch(f"http://{HOST}/", Resolver([]))).code == "unresolvable_host"


def test_non_http_schemes_are_unsupported() -> None:
    assert media_error(fetch(f"ftp://{HOST}/v.mp4", Resolver())).code == "unsupported_url"


# -- replies --


def test_redirect_is_not_followed() -> None:
    async def run() -> tuple[MediaError, Seen]:
        reply = respond("302 Found", {"Location": "http://10.0.0.1/", "Content-Length": "0"})
        async with serving(reply) as (port, seen):
            with pytest.raises(MediaError) as caught:
                await fetch(f"http://{HOST}:{port}/", Resolver(["127.0.0.1"]))
            return caught.value, seen

    error, seen = asyncio.run(run())
    assert (error.code, error.status) == ("fetch_failed", 400)
    assert "302" in error.message
    assert len(seen.targets) == 1


def test_error_status_is_fetch_failed() -> None:
    async def run() -> MediaError:
        async with serving(respond("404 Not Found", {"Content-Length": "0"})) as (port, _):
            with pytest.raises(MediaError) as caught:
                await fetch(f"http://{HOST}:{port}/", Resolver(["127.0.0.1"]))
            return caught.value

    error = asyncio.run(run())
    assert error.code == "fetch_failed"
    assert "404" in error.message


def chunked(body: bytes, size: int = 100) -> Reply:
    async def reply(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for start in range(0, len(body), size):
            part = body[start : start + size]
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    return reply


@pytest.mark.parametrize(
    "reply",
    [ok(b"x" * 1025), chunked(b"x" * 5000)],
    ids=["declared", "streamed"],
)
def test_oversize_body_is_413(reply: Reply) -> None:
    async def run() -> MediaError:
        async with serving(reply) as (port, _):
            with pytest.raises(MediaError) as caught:
                await fetch(f"http://{HOST}:{port}/", Resolver(["127.0.0.1"]), max_bytes=1024)
            return caught.value

    error = asyncio.run(run())
    assert (error.code, error.status) == ("media_too_large", 413)


def test_body_at_the_limit_passes_and_mime_may_be_absent() -> None:
    async def run() -> RemoteMedia:
        async with serving(chunked(b"y" * 1024)) as (port, _):
            return await fetch(f"http://{HOST}:{port}/", Resolver(["127.0.0.1"]), max_bytes=1024)

    assert asyncio.run(run()) == RemoteMedia(b"y" * 1024, None)


def test_encoded_body_is_refused() -> None:
    reply = respond("200 OK", {"Content-Encoding": "gzip", "Content-Length": "3"}, b"abc")

    async def run() -> MediaError:
        async with serving(reply) as (port, _):
            with pytest.raises(MediaError) as caught:
                await fetch(f"http://{HOST}:{port}/", Resolver(["127.0.0.1"]))
            return caught.value

    error = asyncio.run(run())
    assert error.code == "fetch_failed"
    assert "gzip" in error.message


# -- the total deadline --


async def trickle(writer: asyncio.StreamWriter) -> None:
    """Headers at once, then a byte every 0.2 s: every read is quick, the whole is endless."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    for _ in range(1000):
        writer.write(b"x")
        await writer.drain()
        await asyncio.sleep(0.2)


async def silent(writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(30)


@pytest.mark.parametrize("reply", [trickle, silent])
def test_total_deadline_cuts_off_a_slow_server(reply: Reply) -> None:
    async def run() -> MediaError:
        async with serving(reply) as (port, _):
            with pytest.raises(MediaError) as caught:
                await fetch(
                    f"http://{HOST}:{port}/",
                    Resolver(["127.0.0.1"]),
                    max_bytes=10_000,
                    deadline_seconds=1.0,
                )
            return caught.value

    start = time.monotonic()
    error = asyncio.run(run())
    assert time.monotonic() - start < 3.0
    assert (error.code, error.status) == ("fetch_timeout", 400)
    assert "1 s" in error.message


def test_total_deadline_covers_resolution() -> None:
    async def slow(host: str, port: int) -> list[str]:
        await asyncio.sleep(30)
        return ["127.0.0.1"]

    start = time.monotonic()
    error = media_error(fetch(f"http://{HOST}/", slow, deadline_seconds=0.5))
    assert time.monotonic() - start < 3.0
    assert error.code == "fetch_timeout"


# -- HTTPS: SNI and certificate verification use the host name, not the address --


def certificates(tmp: Path, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A throwaway CA and a leaf certificate for `name` (no IP address in it): the server's
    context and a client context that trusts only that CA."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(
        subject: str, key: Any, issuer: str, signer: Any, ca: bool, san: str | None
    ) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san is not None:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate("test CA", ca_key, "test CA", ca_key, True, None)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = certificate(name, leaf_key, "test CA", ca_key, False, name)
    pem = serialization.Encoding.PEM
    (tmp / "leaf.pem").write_bytes(
        leaf.public_bytes(pem)
        + leaf_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp / "leaf.pem")
    client = ssl.create_default_context(cadata=ca.public_bytes(pem).decode())
    return server, client


def test_https_sends_the_host_name_as_sni_and_verifies_the_certificate_against_it(
    tmp_path: Path,
) -> None:
    server_tls, client_tls = certificates(tmp_path, HOST)
    seen_sni: list[str | None] = []

    def record_sni(_: ssl.SSLObject, name: str | None, __: ssl.SSLContext) -> None:
        seen_sni.append(name)

    server_tls.sni_callback = record_sni

    async def run() -> tuple[RemoteMedia, Seen, int]:
        async with serving(ok(b"secure"), tls=server_tls) as (port, seen):
            url = f"https://{HOST}:{port}/v.mp4"
            media = await fetch(url, Resolver(["127.0.0.1"]), ssl_context=client_tls)
            return media, seen, port

    media, seen, port = asyncio.run(run())
    assert media == RemoteMedia(b"secure", "video/mp4")
    assert seen_sni == [HOST]
    assert seen.headers[0]["host"] == f"{HOST}:{port}"


def test_https_certificate_for_another_name_is_refused(tmp_path: Path) -> None:
    server_tls, client_tls = certificates(tmp_path, "other.example")

    async def run() -> tuple[MediaError, Seen]:
        async with serving(ok(b"x"), tls=server_tls) as (port, seen):
            with pytest.raises(MediaError) as caught:
                url = f"https://{HOST}:{port}/"
                await fetch(url, Resolver(["127.0.0.1"]), ssl_context=client_tls)
            return caught.value, seen

    error, seen = asyncio.run(run())
    assert error.code == "fetch_failed"
    assert "certificate" in error.message.lower()
    assert seen.targets == []


# -- the address policy --

FORBIDDEN = [
    "10.0.0.1",  # private
    "172.16.5.4",
    "192.168.1.1",
    "127.0.0.1",  # loopback
    "127.255.255.254",
    "0.0.0.0",  # unspecified / this network
    "169.254.169.254",  # link-local (cloud metadata)
    "100.64.0.1",  # shared address space (CGNAT)
    "198.18.0.1",  # benchmarking
    "192.0.0.9",  # IETF protocol assignments
    "192.0.2.1",  # documentation
    "203.0.113.7",
    "224.0.0.1",  # multicast (Python 3.11.7 calls it global)
    "239.255.255.250",
    "240.0.0.1",  # reserved
    "255.255.255.255",  # broadcast
    "::",  # unspecified
    "::1",  # loopback
    "fe80::1",  # link-local
    "fe80::1%1",  # scoped
    "fec0::1",  # site-local (Python 3.11.7 calls it global)
    "fc00::1",  # unique local
    "fd12:3456::1",
    "ff02::1",  # multicast
    "ff0e::1",  # global-scope multicast (Python 3.11.7 calls it global)
    "::ffff:127.0.0.1",  # IPv4-mapped loopback
    "::ffff:10.0.0.1",  # IPv4-mapped private
    "::ffff:169.254.169.254",
    "::127.0.0.1",  # IPv4-compatible (deprecated): refused whatever it embeds
    "::8.8.8.8",
    "64:ff9b::a00:1",  # NAT64 well-known prefix embedding 10.0.0.1
    "64:ff9b::7f00:1",  # ... embedding 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # ... embedding 169.254.169.254
    "64:ff9b:1::808:808",  # local-use NAT64 prefix: refused outright
    "2002:a00:1::1",  # 6to4 embedding 10.0.0.1
    "2002:808:808::1",  # 6to4 embedding 8.8.8.8: refused outright too (deprecated)
    "2001::1",  # Teredo
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",
    "2001:db8::1",  # documentation
    "3fff::1",
    "100::1",  # discard-only
    "5f00::1",  # SRv6 SIDs (outside 2000::/3)
]
ALLOWED = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.215.14",
    "2606:4700::1111",
    "2001:4860:4860::8888",
    "::ffff:8.8.8.8",  # IPv4-mapped: judged by its IPv4 address
    "64:ff9b::808:808",  # NAT64 (DNS64 on IPv6-only networks) embedding 8.8.8.8
]


@pytest.mark.parametrize("address", FORBIDDEN)
def test_non_public_addresses_are_forbidden(address: str) -> None:
    with pytest.raises(MediaError) as caught:
        check_public_address(address)
    assert (caught.value.code, caught.value.status) == ("forbidden_url", 400)
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_allowed(address: str) -> None:
    check_public_address(address)
    assert is_public(ipaddress.ip_address(address))


def test_a_non_address_is_forbidden() -> None:
    with pytest.raises(MediaError) as caught:
        check_public_address("media.example")
    assert caught.value.code == "forbidden_url"


def test_the_production_policy_refuses_a_host_with_any_private_address() -> None:
    resolver = Resolver(["8.8.8.8", "64:ff9b::a00:1"])
    error = media_error(
        fetch_remote(
            f"http://{HOST}/",
            allowlist=[HOST],
            max_bytes=10,
            deadline_seconds=5.0,
            resolver=resolver,
        )
    )
    assert error.code == "forbidden_url"
    assert resolver.calls == [(HOST, 80)]
