"""GET a web page for an agent, from the hosts its agent file allows and nowhere else.

Every hop (the URL, then each redirect, at most MAX_REDIRECTS) is checked before it is requested:
- http and https only; no user:password@ in the URL.
- The host must match an `allow` entry (case-insensitive, a trailing dot ignored, non-ASCII names in
  their IDNA form):
    docs.python.org        that host, on the scheme's default port (80 for http, 443 for https)
    *.python.org           any name below python.org (a.python.org, a.b.python.org), not python.org
    docs.python.org:8080   that host on port 8080 (and no other), with either scheme
    127.0.0.1:8080  [::1]:8080  localhost:8080   addresses and localhost are written the same way
  Another port must be listed: on an allowed machine other ports are other services (on 127.0.0.1,
  the LLM engine and the Stigmer API).
- Private addresses are reached only when named. The host is resolved first; if any of its addresses
  is loopback, private, link-local, shared (100.64/10), reserved, multicast or unspecified (also
  inside IPv4-mapped, 6to4, Teredo and NAT64 IPv6 addresses), the request is refused unless the
  matching entry is that literal address or `localhost` (which must then resolve to loopback only).
  So an allowed name that resolves to 127.0.0.1 or 169.254.169.254 (DNS rebinding, cloud metadata)
  is refused, and `127.1` or `2130706433` do not match an entry `127.0.0.1`.
- The connection goes to the address that was checked (the name still goes in Host and in TLS SNI,
  and the certificate is verified against the name), so a second DNS answer cannot change the target.
- Proxies from the environment (HTTP(S)_PROXY, ALL_PROXY, NO_PROXY; http(s):// proxies, not SOCKS)
  are used for public hosts; a private address (allowed by its literal entry) is reached directly,
  never through a proxy. Through a proxy
  the proxy resolves the name: a name that resolves here to a private address is still refused, but
  a name that does not resolve here at all is left to the proxy.
- The body is read up to max_bytes (after gzip decoding, itself bounded, so a compression bomb costs
  nothing; only gzip is asked for, a zlib-wrapped deflate answer is decoded too); a binary content
  type gets a one-line description instead of bytes.
- `timeout` bounds each network wait and the whole fetch (checked between reads, so the total can
  exceed it by at most one read's wait).
"""

from __future__ import annotations

import codecs
import ipaddress
import logging
import os
import re
import socket
import ssl
import time
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from stigmer import __version__
from stigmer.tools.errors import ToolFailure

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
MAX_URL = 8192
CHUNK = 64 * 1024
SNIFF_BYTES = 8192
USER_AGENT = f"stigmer/{__version__} (agent http tool)"
REDIRECTS = (301, 302, 303, 307, 308)
DEFAULT_PORTS = {"http": 80, "https": 443}
TEXT_TYPES = (
    "application/json", "application/xml", "application/javascript", "application/ecmascript",
    "application/x-javascript", "application/yaml", "application/x-yaml", "application/toml",
    "application/x-sh", "application/sql", "application/graphql", "application/x-ndjson",
    "application/x-www-form-urlencoded", "image/svg+xml",
)  # fmt: skip

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# NO_PROXY as urllib reads it (domains, suffixes, "*"); public in urllib.request, missing from typeshed.
_bypass: Callable[[str, dict[str, str]], bool] = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]


@dataclass(frozen=True)
class FetchResult:
    status: int
    content_type: str
    text: str  # the body as text, a note appended when truncated; a description for binary content
    truncated: bool
    url: str = ""  # where the answer came from, after redirects


@dataclass(frozen=True)
class AllowEntry:
    host: str  # normalised; for a wildcard, the domain after "*."
    port: int | None  # None: the scheme's default port only
    wildcard: bool = False

    @property
    def literal(self) -> bool:
        """An address or localhost: the one kind of entry that may lead to a private address."""
        return _ip(self.host) is not None or self.host == "localhost"

    def matches(self, host: str, port: int, scheme: str) -> bool:
        if self.port is None and port != DEFAULT_PORTS[scheme]:
            return False
        if self.port is not None and port != self.port:
            return False
        return host.endswith("." + self.host) if self.wildcard else host == self.host


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # normalised
    port: int
    path: str  # path and query, never empty

    @property
    def authority(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return shown if self.port == DEFAULT_PORTS[self.scheme] else f"{shown}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.authority}{self.path}"


def fetch(url: str, *, allow: Sequence[str], max_bytes: int = 1_000_000, timeout: float = 30) -> FetchResult:
    """GET `url` from an allowed host (see the module docstring for the rules)."""
    if max_bytes < 1 or timeout <= 0:
        raise ValueError("max_bytes must be at least 1 and timeout positive")
    if isinstance(allow, str):
        raise ValueError("allow is a list of hosts, not one string")
    entries = [_entry(e) for e in allow]
    deadline = time.monotonic() + timeout
    current = url
    for _hop in range(MAX_REDIRECTS + 1):
        target = _target(current)
        entry = match_entry(entries, target.host, target.port, target.scheme)
        if entry is None:
            listed = ", ".join(allow) or "nothing"
            raise ToolFailure(
                f"{target.authority} is not in this agent's allow list for the http tool (allowed: {listed}); "
                "only the user can add hosts, in the agent file"
            )
        answer = _request(target, entry, max_bytes=max_bytes, deadline=deadline, timeout=timeout)
        if isinstance(answer, FetchResult):
            return answer
        current = answer
    raise ToolFailure(f"more than {MAX_REDIRECTS} redirects; the last one pointed to {current[:200]}")


def parse_allow_entry(entry: str) -> AllowEntry:
    """An `allow:` entry checked and normalised; ValueError saying what is wrong with it."""
    text = entry.strip().lower()
    if not text:
        raise ValueError("an entry is empty")
    if "/" in text or "@" in text:
        raise ValueError(f"{entry!r}: write a host such as docs.python.org (no scheme, path or user)")
    wildcard = text.startswith("*.")
    if wildcard:
        text = text[2:]
    if "*" in text:
        raise ValueError(f"{entry!r}: '*' may only start an entry, as in *.example.com")
    host_text, port = _host_port(text, entry)
    host = normalize_host(host_text)
    if host is None:
        raise ValueError(f"{entry!r} is not a host name or address")
    if wildcard and (_ip(host) is not None or "." not in host):
        raise ValueError(f"{entry!r}: a wildcard needs a domain with a dot, as in *.example.com")
    return AllowEntry(host, port, wildcard)


def match_entry(entries: Sequence[AllowEntry], host: str, port: int, scheme: str) -> AllowEntry | None:
    """The first entry allowing a normalised host and port (see normalize_host), or None."""
    return next((e for e in entries if e.matches(host, port, scheme)), None)


def is_public(address: IPAddress) -> bool:
    """Whether an address is on the public internet (and so is every IPv4 address it carries)."""
    for a in _with_embedded(address):
        if (
            not a.is_global
            or a.is_private
            or a.is_loopback
            or a.is_link_local
            or a.is_multicast
            or a.is_reserved
            or a.is_unspecified
        ):
            return False
    return True


def _with_embedded(address: IPAddress) -> list[IPAddress]:
    found: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            found.append(address.ipv4_mapped)
        if address.sixtofour is not None:
            found.append(address.sixtofour)
        if address.teredo is not None:
            found.extend(address.teredo)
        if address in _NAT64:
            found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def _entry(entry: object) -> AllowEntry:
    try:
        if not isinstance(entry, str):
            raise ValueError(f"{entry!r} is not text")
        return parse_allow_entry(entry)
    except ValueError as e:
        raise ToolFailure(
            f"the http tool's allow list is invalid: {e}; ask the user to fix the agent file"
        ) from None


def _host_port(text: str, entry: str) -> tuple[str, int | None]:
    if text.startswith("["):
        end = text.find("]")
        rest = text[end + 1 :] if end > 0 else "?"
        if rest and not rest.startswith(":"):
            raise ValueError(f"{entry!r} is not a host name or address")
        host, port_text = text[1:end], (rest[1:] if rest else None)
    elif text.count(":") > 1:
        host, port_text = text, None  # a bare IPv6 address; with a port it needs [brackets]
    else:
        host, colon, port_text_raw = text.partition(":")
        port_text = port_text_raw if colon else None
    if port_text is None:
        return host, None
    if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
        raise ValueError(f"{entry!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


def _ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def normalize_host(host: str) -> str | None:
    """Lower-case, no trailing dot, addresses in their canonical form, names in IDNA; None if invalid."""
    host = host.lower()
    if host.endswith(".") and not host.endswith(".."):
        host = host[:-1]
    if "%" in host:  # IPv6 zone ids name an interface of this machine: never meant for a fetch
        return None
    address = _ip(host)
    if address is not None:
        return address.compressed
    try:
        name = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        return None
    return name if len(name) <= 253 and _NAME.fullmatch(name) else None


def _target(url: object) -> _Target:
    if not isinstance(url, str) or not url:
        raise ToolFailure("give the URL to fetch, such as https://docs.python.org/3/")
    if len(url) > MAX_URL:
        raise ToolFailure(f"the URL is longer than {MAX_URL} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise ToolFailure("the URL contains spaces or control characters; percent-encode them")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ToolFailure(
            f"only http and https URLs can be fetched, not {scheme + ':' if scheme else url[:100]!r}"
        )
    if "@" in parts.netloc:
        raise ToolFailure("URLs with a user name or password are not allowed")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        raise ToolFailure("the URL's port must be a number from 1 to 65535") from None
    host = normalize_host(parts.hostname or "")
    if host is None:
        raise ToolFailure(f"the URL's host {parts.netloc[:100]!r} is not a valid host name or address")
    path = parts.path or "/"
    return _Target(scheme, host, port, f"{path}?{parts.query}" if parts.query else path)


def _resolve(host: str, port: int) -> list[IPAddress]:
    """Every address of a name (the one boundary tests replace: DNS)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    return found


def checked_addresses(host: str, port: int, entry: AllowEntry) -> list[IPAddress] | None:
    """The addresses a normalised host allowed by `entry` may be reached at (connect to these, do not
    resolve again); None when a name does not resolve here. ToolFailure when it must not be reached: a
    private or local address under an entry that is not that literal address (or localhost)."""
    literal = _ip(host)
    if literal is not None:
        found = [literal]
    else:
        try:
            found = _resolve(host, port)
        except OSError:
            if entry.literal:  # localhost: never left to a proxy
                raise ToolFailure(f"could not resolve the host name {host}") from None
            return None
    if not found:
        raise ToolFailure(f"could not resolve the host name {host}")
    if host == "localhost" and not all(a.is_loopback for a in found):
        raise ToolFailure(
            "localhost does not resolve to this machine only here; allow 127.0.0.1:PORT instead"
        )
    private = [a for a in found if not is_public(a)]
    if private and not entry.literal:
        raise ToolFailure(
            f"{host} resolves to a private or local address ({private[0]}), which is refused; "
            "the agent file must allow that address itself (e.g. 127.0.0.1:8080) to reach it"
        )
    return found


def _proxy(scheme: str, host: str) -> str | None:
    proxies = urllib.request.getproxies_environment()
    if _bypass(host, proxies):
        return None
    value = proxies.get(scheme) or proxies.get("all")
    if not value:
        return None
    value = value if "://" in value else "http://" + value
    if urlsplit(value).scheme.lower() not in DEFAULT_PORTS:
        raise ToolFailure(
            f"the environment names a {urlsplit(value).scheme} proxy, which the http tool cannot use; "
            "use an http:// proxy in HTTPS_PROXY/HTTP_PROXY"
        )
    return value


def _verify() -> ssl.SSLContext | bool:
    """The environment's CA bundle when it names one (as curl and pip do), else httpx's own."""
    cafile, capath = os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")
    if cafile or capath:
        return ssl.create_default_context(cafile=cafile or None, capath=capath or None)
    return True


def _request(
    target: _Target, entry: AllowEntry, *, max_bytes: int, deadline: float, timeout: float
) -> FetchResult | str:
    """One hop: the result, or the next URL when the answer is a redirect."""
    addresses = checked_addresses(target.host, target.port, entry)
    local = addresses is not None and not all(is_public(a) for a in addresses)
    proxy = None if local else _proxy(target.scheme, target.host)
    if addresses is None and proxy is None:
        raise ToolFailure(f"could not resolve the host name {target.host}")
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "gzip", "Accept": "*/*"}
    try:
        with httpx.Client(trust_env=False, follow_redirects=False, verify=_verify(), proxy=proxy) as client:
            response = _open(client, target, None if proxy else addresses, headers, deadline)
            try:
                location = response.headers.get("location")
                if response.status_code in REDIRECTS and location:
                    log.debug("%s redirects to %s", target.url, location[:200])
                    return str(urljoin(target.url, str(location)))
                return _result(response, target, max_bytes=max_bytes, deadline=deadline, timeout=timeout)
            finally:
                response.close()
    except httpx.TimeoutException:
        raise ToolFailure(f"timed out after {timeout:g}s fetching from {target.authority}") from None
    except httpx.ProxyError as e:
        raise ToolFailure(f"the proxy failed the request to {target.authority}: {e}") from None
    except httpx.ConnectError as e:
        raise ToolFailure(f"could not connect to {target.authority}: {e}") from None
    except httpx.HTTPError as e:
        raise ToolFailure(f"fetching from {target.authority} failed: {e}") from None
    except httpx.InvalidURL as e:
        raise ToolFailure(f"invalid URL: {e}") from None


def _open(
    client: httpx.Client,
    target: _Target,
    addresses: list[IPAddress] | None,
    headers: dict[str, str],
    deadline: float,
) -> httpx.Response:
    """Send the request; pinned to the checked addresses (tried in turn) unless a proxy resolves it."""
    if addresses is None:
        request = client.build_request("GET", target.url, headers=headers, timeout=_left(deadline, target))
        return client.send(request, stream=True)
    failure: httpx.ConnectError | None = None
    for address in addresses:
        netloc = f"[{address}]" if address.version == 6 else str(address)
        pinned = f"{target.scheme}://{netloc}:{target.port}{target.path}"
        extensions = (
            {"sni_hostname": target.host} if target.scheme == "https" and _ip(target.host) is None else {}
        )
        request = client.build_request(
            "GET",
            pinned,
            headers={**headers, "Host": target.authority},
            extensions=extensions,
            timeout=_left(deadline, target),
        )
        try:
            return client.send(request, stream=True)
        except httpx.ConnectError as e:
            failure = e
    assert failure is not None  # checked_addresses never returns an empty list
    raise failure


def _left(deadline: float, target: _Target) -> httpx.Timeout:
    left = deadline - time.monotonic()
    if left <= 0:
        raise httpx.ReadTimeout(f"no time left for {target.authority}")
    return httpx.Timeout(left)


def _result(
    response: httpx.Response, target: _Target, *, max_bytes: int, deadline: float, timeout: float
) -> FetchResult:
    content_type = response.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    status = response.status_code
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if media and not _is_text(media):
        return FetchResult(status, content_type, _describe(media, response), False, target.url)
    if encoding not in ("identity", "", "gzip", "x-gzip", "deflate"):
        text = f"[content compressed as {encoding[:40]}, which this tool cannot decode; not shown]"
        return FetchResult(status, content_type, text, False, target.url)
    body, truncated = _read(response, encoding, max_bytes=max_bytes, deadline=deadline, timeout=timeout)
    if not media and b"\0" in body[:SNIFF_BYTES]:
        return FetchResult(
            status, content_type, f"[binary content, {len(body)} bytes read; not shown]", False, target.url
        )
    text = codecs.getincrementaldecoder(_charset(content_type))("replace").decode(body, not truncated)
    if truncated:
        text += f"\n[truncated: only the first {max_bytes} bytes were read]"
    return FetchResult(status, content_type, text, truncated, target.url)


def _read(
    response: httpx.Response, encoding: str, *, max_bytes: int, deadline: float, timeout: float
) -> tuple[bytes, bool]:
    """At most max_bytes of the decoded body, and whether there was more. Stops reading there."""
    gzip = encoding in ("gzip", "x-gzip")
    inflate = (
        None
        if encoding in ("identity", "")
        else zlib.decompressobj(16 + zlib.MAX_WBITS if gzip else zlib.MAX_WBITS)
    )
    body = bytearray()
    raw = 0
    for chunk in response.iter_raw(CHUNK):
        raw += len(chunk)
        room = max_bytes + 1 - len(body)  # one byte more than wanted tells "truncated" from "exactly"
        if inflate is None:
            body += chunk[:room]
        else:
            try:
                body += inflate.decompress(inflate.unconsumed_tail + chunk, room)
            except zlib.error:
                raise ToolFailure(f"{_host_of(response)} sent a damaged {encoding} body") from None
        if len(body) > max_bytes or raw > 2 * max_bytes + CHUNK:
            return bytes(body[:max_bytes]), True
        if time.monotonic() > deadline:
            raise ToolFailure(f"timed out after {timeout:g}s reading from {_host_of(response)}")
    return bytes(body), False


def _host_of(response: httpx.Response) -> str:
    return str(response.request.headers.get("host", "the server"))


def _is_text(media: str) -> bool:
    return media.startswith("text/") or media in TEXT_TYPES or media.endswith(("+json", "+xml"))


def _describe(media: str, response: httpx.Response) -> str:
    length = response.headers.get("content-length", "")
    size = f"{length} bytes" if length.isdigit() else "size not given"
    return f"[binary content ({media}, {size}); not shown: this tool returns text only]"


def _charset(content_type: str) -> str:
    match = re.search(r"charset=\"?([A-Za-z0-9._:-]+)", content_type, re.IGNORECASE)
    if match:
        try:
            return str(codecs.lookup(match.group(1)).name)
        except LookupError:
            pass
    return "utf-8"
