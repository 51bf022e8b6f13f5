"""Reading media bytes from outside: local paths, file:// and http(s) URLs, data: URIs, raw bytes.

Every byte the processor takes from a user-named place comes through `open_source`, so the limits
of a `MediaPolicy` are enforced in one spot. For remote URLs the host is resolved once, every
address is checked, and the connection goes to the checked address (no second DNS lookup that a
rebinding attacker could answer differently); Host header and TLS SNI still carry the name.
Redirects are followed by hand, each hop checked again. One deadline covers the whole fetch: name
resolution (which has no timeout of its own), connect, every redirect and every read of the body.
Decoding limits (pixels, frames) are applied by image.py and video.py with the numbers from the same
policy.
"""

import base64
import binascii
import http.client
import ipaddress
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit


class MediaError(ValueError):
    """A media source was refused or could not be read; the message names the problem and limit."""


@dataclass(frozen=True)
class MediaPolicy:
    """Limits for reading media. The defaults suit the Python API: local files anywhere are
    allowed (the caller already has them), remote URLs are fetched but never from private,
    loopback, link-local, multicast or reserved addresses. A server should narrow this:
    `local_roots=(folder,)` or `allow_local_files=False`, smaller byte limits, `allowed_hosts`."""

    max_image_bytes: int = 64 * 2**20
    max_video_bytes: int = 1024 * 2**20
    max_image_pixels: int = 8192 * 8192  # width*height read from the header, before decoding
    max_video_seconds: float = 4 * 3600.0
    max_video_frames: int = 768  # frames sampled from one video
    timeout: float = 20.0  # seconds for a whole download: resolving, connecting, redirects, the body
    max_redirects: int = 5
    allow_local_files: bool = True
    local_roots: tuple[str | Path, ...] | None = None  # None: any folder
    allow_remote: bool = True
    allowed_hosts: tuple[str, ...] | None = None  # None: any; ".example.com" also matches subdomains
    allow_private: bool = False  # True also allows loopback etc.: for tests and trusted networks


def open_source(source, policy: MediaPolicy, *, max_bytes: int, what: str = "media") -> bytes | Path:
    """Bytes for in-memory sources and downloads, a checked Path for local files (opened lazily
    by the caller, so a big local video is never read whole). `what` names the item in errors."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        _check_size(len(data), max_bytes, what)
        return data
    if isinstance(source, Path):
        return local_path(source, policy, max_bytes=max_bytes, what=what)
    if not isinstance(source, str):
        raise MediaError(f"unsupported {what} source of type {type(source).__name__}; expected a path, "
                         "URL, data URI, bytes or PIL image")
    if source.startswith("data:"):
        return decode_data_uri(source, max_bytes=max_bytes, what=what)
    if source.startswith(("http://", "https://")):
        return fetch_url(source, policy, max_bytes=max_bytes, what=what)
    if source.startswith("file://"):
        # As qwen-vl-utils: everything after "file://" is the path, so file:///a/b is /a/b.
        source = source[len("file://"):]
    elif re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", source):
        raise MediaError(f"unsupported URL scheme in {what} source {source[:80]!r}")
    return local_path(source, policy, max_bytes=max_bytes, what=what)


def local_path(path: str | Path, policy: MediaPolicy, *, max_bytes: int, what: str = "media") -> Path:
    if not policy.allow_local_files:
        raise MediaError(f"local {what} files are not allowed here (MediaPolicy.allow_local_files=False)")
    real = Path(path).resolve()  # follows symlinks and removes "..", so roots can't be escaped
    if policy.local_roots is not None:
        roots = [Path(r).resolve() for r in policy.local_roots]
        if not any(real.is_relative_to(root) for root in roots):
            raise MediaError(f"{what} path {str(path)!r} is outside the allowed folders "
                             f"(MediaPolicy.local_roots={[str(r) for r in roots]})")
    if not real.is_file():
        raise MediaError(f"{what} file not found: {str(path)!r}")
    _check_size(real.stat().st_size, max_bytes, what)
    return real


def decode_data_uri(uri: str, *, max_bytes: int, what: str = "media") -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep or not header.endswith(";base64"):
        raise MediaError(f"{what} data URI must look like data:<type>;base64,<data>")
    payload = "".join(payload.split())  # tolerate line breaks in long payloads
    _check_size(len(payload) // 4 * 3, max_bytes, what)  # before decoding anything
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"{what} data URI holds invalid base64 ({e})") from None


def fetch_url(url: str, policy: MediaPolicy, *, max_bytes: int, what: str = "media") -> bytes:
    """GET `url` under the policy: checked addresses, manual redirects, a byte cap while streaming,
    one deadline for everything."""
    if not policy.allow_remote:
        raise MediaError(f"remote {what} URLs are not allowed here (MediaPolicy.allow_remote=False)")
    deadline = time.monotonic() + policy.timeout
    for _ in range(policy.max_redirects + 1):
        response, conn, sock = _request(url, policy, deadline, what)
        try:
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise MediaError(f"{what} URL {url!r}: redirect without a Location header")
                url = urljoin(url, location)
                continue
            if response.status != 200:
                raise MediaError(f"{what} URL {url!r}: HTTP {response.status} {response.reason}")
            return _read_body(response, sock, deadline, max_bytes, what, url)
        finally:
            conn.close()
    raise MediaError(f"{what} URL: more than {policy.max_redirects} redirects (MediaPolicy.max_redirects)")


def _request(url: str, policy: MediaPolicy, deadline: float, what: str):
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise MediaError(f"{what} URL {url[:80]!r}: only http and https are allowed")
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise MediaError(f"{what} URL {url[:80]!r}: {e}") from None
    if not host:
        raise MediaError(f"{what} URL {url[:80]!r} has no host")
    if parts.username is not None:
        raise MediaError(f"{what} URL {url[:80]!r}: credentials in URLs are not supported")
    if policy.allowed_hosts is not None and not _host_allowed(host, policy.allowed_hosts):
        raise MediaError(f"{what} host {host!r} is not in MediaPolicy.allowed_hosts")
    ip = resolve_checked(host, port, policy, what, deadline)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(host, port, timeout=_remaining(deadline, what))  # connect (and TLS handshake) within it
    # Connect to the address we checked; the name stays in Host and in TLS SNI/cert checks.
    conn._create_connection = lambda _addr, timeout, source: socket.create_connection(
        (ip, port), timeout, source)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.connect()
        sock = conn.sock  # kept: a response that closes the connection takes conn.sock away
        sock.settimeout(_remaining(deadline, what))  # what connecting left, for the request and headers
        conn.request("GET", target, headers={"User-Agent": "qwen2vl", "Accept": "*/*"})
        return conn.getresponse(), conn, sock
    except TimeoutError:
        conn.close()
        raise _timed_out(what) from None
    except (OSError, http.client.HTTPException) as e:
        conn.close()
        raise MediaError(f"{what} URL {url[:80]!r}: {type(e).__name__}: {e}") from None


def _read_body(response, sock: socket.socket, deadline: float, max_bytes: int, what: str, url: str) -> bytes:
    length = response.getheader("Content-Length")
    if length is not None and length.isdigit():
        _check_size(int(length), max_bytes, what)
    chunks, total = [], 0
    try:
        while True:
            sock.settimeout(_remaining(deadline, what))  # a read may wait only for what is left
            chunk = response.read1(64 * 1024)  # whatever has arrived: a slow drip can't stall us
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            _check_size(total, max_bytes, what)  # enforced while streaming, whatever the header said
            chunks.append(chunk)
    except TimeoutError:
        raise _timed_out(what) from None
    except (OSError, http.client.HTTPException) as e:
        raise MediaError(f"{what} URL {url[:80]!r}: download failed: {type(e).__name__}: {e}") from None


def resolve_checked(host: str, port: int, policy: MediaPolicy, what: str = "media",
                    deadline: float | None = None) -> str:
    """Resolve `host` once and return an address to connect to. Refused if ANY of its addresses is
    non-public (unless allow_private), so a name can't mix a public and a private answer."""
    deadline = time.monotonic() + policy.timeout if deadline is None else deadline
    infos = _resolve(host, port, deadline, what)
    ips = [info[4][0] for info in infos]
    if not ips:
        raise MediaError(f"{what} host {host!r} has no addresses")
    if not policy.allow_private:
        for ip in ips:
            if not is_public_address(ip):
                raise MediaError(f"{what} host {host!r} resolves to non-public address {ip}; private, "
                                 "loopback, link-local, multicast and reserved addresses are blocked "
                                 "(MediaPolicy.allow_private=False)")
    return ips[0]


def _resolve(host: str, port: int, deadline: float, what: str) -> list:
    """getaddrinfo, waited for until the deadline. It has no timeout of its own (a slow resolver
    takes its own seconds per try), so it runs in a daemon thread that we stop waiting for; the
    thread ends when the resolver answers, and its answer is dropped."""
    answer: dict = {}

    def run():
        try:
            answer["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:  # gaierror is an OSError
            answer["error"] = e

    thread = threading.Thread(target=run, name="qwen2vl-resolve", daemon=True)
    thread.start()
    thread.join(_remaining(deadline, what))
    if thread.is_alive():
        raise _timed_out(what, f"resolving {host!r}")
    if "error" in answer:
        raise MediaError(f"{what} host {host!r} could not be resolved ({answer['error']})")
    return answer["infos"]


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_public_address(ip: str) -> bool:
    """True for globally routable unicast addresses; IPv4 embedded in IPv6 is checked too."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = addr.ipv4_mapped or addr.sixtofour or (addr.teredo[1] if addr.teredo else None)
        if embedded is None and addr in _NAT64:
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if embedded is not None and not is_public_address(str(embedded)):
            return False
    return addr.is_global and not addr.is_multicast


def _host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    return any(host == a.lower() or (a.startswith(".") and host.endswith(a.lower())) for a in allowed)


def _remaining(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _timed_out(what)
    return left


def _timed_out(what: str, during: str = "") -> MediaError:
    return MediaError(f"{what} download timed out{' ' + during if during else ''} (MediaPolicy.timeout)")


def _check_size(size: int, max_bytes: int, what: str) -> None:
    if size > max_bytes:
        raise MediaError(f"{what} is {size:,} bytes or more, over the limit of {max_bytes:,} bytes")
