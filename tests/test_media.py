"""Media access under a MediaPolicy: a real HTTP server on 127.0.0.1, address blocking, redirects,
byte/pixel limits, broken inputs, local roots."""

import base64
import io
import shutil
import ssl
import struct
import subprocess
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from qwen2vl.processing import media
from qwen2vl.processing.image import load_image
from qwen2vl.processing.media import MediaError, MediaPolicy, is_public_address, open_source

OPEN = MediaPolicy(allow_private=True)  # the test server is on loopback


def png_bytes(width=31, height=17, seed=0):
    data = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(data).save(buf, format="PNG")
    return buf.getvalue()


PNG = png_bytes()


class Handler(BaseHTTPRequestHandler):
    seen_hosts: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        Handler.seen_hosts.append(self.headers["Host"])
        path = self.path
        if path == "/img.png":
            self._send(200, PNG, length=True)
        elif path == "/big-with-length":
            self._send(200, b"x" * 300_000, length=True)
        elif path == "/big-without-length":  # HTTP/1.0, body ends at close: only streaming can stop it
            self._send(200, b"x" * 3_000_000, length=False)
        elif path.startswith("/redirect-to/"):
            self.send_response(302)
            self.send_header("Location", path[len("/redirect-to/"):].replace("_", "/"))
            self.end_headers()
        elif path == "/loop":
            self.send_response(301)
            self.send_header("Location", "/loop")
            self.end_headers()
        elif path == "/slow":
            time.sleep(1.5)
            self._send(200, PNG, length=True)
        elif path == "/stall":  # headers at once, a byte late in the time limit, then nothing for long
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.flush()
            time.sleep(0.8)
            self.wfile.write(b"x")
            self.wfile.flush()
            time.sleep(5)
        else:
            self._send(404, b"no", length=True)

    def _send(self, status, body, length):
        self.send_response(status)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_fetch_image_from_http(server):
    image = load_image(f"{server}/img.png", OPEN)
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(PNG))))
    assert load_image(f"{server}/redirect-to/_img.png", OPEN).size == (31, 17)


@pytest.mark.parametrize("url", ["http://127.0.0.1:{port}/img.png", "http://localhost:{port}/img.png",
                                 "http://[::1]:{port}/img.png", "http://169.254.169.254/latest/meta-data",
                                 "http://10.1.2.3/x.png", "http://192.168.0.1/x.png", "http://0.0.0.0:{port}/",
                                 "http://2130706433:{port}/img.png", "http://[::ffff:127.0.0.1]:{port}/"])
def test_default_policy_blocks_non_public_addresses(server, url):
    url = url.format(port=server.rsplit(":", 1)[1])
    with pytest.raises(MediaError, match="non-public address"):
        load_image(url)


def test_redirect_to_a_blocked_address_is_refused(server, monkeypatch):
    # Pretend 127.0.0.1 is a public server; its redirect to 127.0.0.2 (loopback) must be refused.
    real = media.is_public_address
    monkeypatch.setattr(media, "is_public_address", lambda ip: ip == "127.0.0.1" or real(ip))
    port = server.rsplit(":", 1)[1]
    assert load_image(f"{server}/img.png").size == (31, 17)
    with pytest.raises(MediaError, match="127.0.0.2"):
        load_image(f"{server}/redirect-to/http:__127.0.0.2:{port}_img.png")
    with pytest.raises(MediaError, match="redirects"):
        load_image(f"{server}/loop")


def test_host_is_resolved_once_and_the_checked_address_is_used(server, monkeypatch):
    port = int(server.rsplit(":", 1)[1])
    calls, real = [], media.socket.getaddrinfo

    def fake_getaddrinfo(host, port_, *args, **kwargs):
        if host != "media.test":  # the numeric connect to the checked address: no DNS involved
            return real(host, port_, *args, **kwargs)
        calls.append(host)
        return [(2, 1, 6, "", ("127.0.0.1", port_))]

    monkeypatch.setattr(media.socket, "getaddrinfo", fake_getaddrinfo)
    Handler.seen_hosts.clear()
    assert load_image(f"http://media.test:{port}/img.png", OPEN).size == (31, 17)
    assert calls == ["media.test"] and Handler.seen_hosts == [f"media.test:{port}"]  # Host header kept
    # A name with one public and one private answer is refused (default policy).
    answers = [(2, 1, 6, "", ("93.184.216.34", 80)), (2, 1, 6, "", ("127.0.0.1", 80))]
    monkeypatch.setattr(media.socket, "getaddrinfo", lambda *a, **k: answers)
    with pytest.raises(MediaError, match="127.0.0.1"):
        load_image("http://media.test/img.png")


def test_is_public_address_table():
    blocked = ["127.0.0.1", "::1", "169.254.169.254", "10.1.2.3", "172.16.5.4", "192.168.1.1", "100.64.0.1",
               "0.0.0.0", "224.0.0.1", "239.255.255.250", "255.255.255.255", "::ffff:127.0.0.1", "fe80::1",
               "fe80::1%eth0", "fc00::1", "ff02::1", "2002:7f00:1::", "64:ff9b::7f00:1", "::"]
    public = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "64:ff9b::808:808"]
    assert [ip for ip in blocked if is_public_address(ip)] == []
    assert [ip for ip in public if not is_public_address(ip)] == []


def test_byte_limits_are_enforced(server):
    small = MediaPolicy(allow_private=True, max_image_bytes=100_000)
    with pytest.raises(MediaError, match="over the limit of 100,000 bytes"):
        load_image(f"{server}/big-with-length", small)
    with pytest.raises(MediaError, match="over the limit of 100,000 bytes"):
        load_image(f"{server}/big-without-length", small)
    with pytest.raises(MediaError, match="over the limit"):
        load_image(PNG, MediaPolicy(max_image_bytes=len(PNG) - 1))
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    with pytest.raises(MediaError, match="over the limit"):
        load_image(uri, MediaPolicy(max_image_bytes=len(PNG) // 2))


def test_timeout_status_scheme_and_host_errors(server):
    with pytest.raises(MediaError, match="timed out|timeout"):
        load_image(f"{server}/slow", MediaPolicy(allow_private=True, timeout=0.3))
    with pytest.raises(MediaError, match="HTTP 404"):
        load_image(f"{server}/missing.png", OPEN)
    with pytest.raises(MediaError, match="scheme"):
        load_image("ftp://example.com/a.png")
    with pytest.raises(MediaError, match="allowed_hosts"):
        load_image(f"{server}/img.png", MediaPolicy(allow_private=True, allowed_hosts=("images.example.com",)))
    with pytest.raises(MediaError, match="allow_remote"):
        load_image(f"{server}/img.png", MediaPolicy(allow_remote=False))
    with pytest.raises(MediaError, match="unsupported"):
        load_image(12345)


def test_a_slow_resolver_counts_against_the_time_limit(monkeypatch):
    """getaddrinfo has no timeout of its own: a resolver that takes 3 s must not hold a 0.3 s fetch."""
    real = media.socket.getaddrinfo

    def slow_getaddrinfo(host, *args, **kwargs):
        if host == "slow-dns.test":
            time.sleep(3)
            return [(2, 1, 6, "", ("93.184.216.34", 80))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(media.socket, "getaddrinfo", slow_getaddrinfo)
    start = time.monotonic()
    with pytest.raises(MediaError, match="timed out.*MediaPolicy.timeout"):
        load_image("http://slow-dns.test/img.png", MediaPolicy(timeout=0.3))
    assert time.monotonic() - start < 1.0


def test_a_stalled_body_ends_at_the_deadline_not_a_socket_timeout_later(server):
    """A byte just before the limit must not buy the next read a whole new socket timeout."""
    start = time.monotonic()
    with pytest.raises(MediaError, match="timed out"):
        load_image(f"{server}/stall", MediaPolicy(allow_private=True, timeout=1.0))
    assert time.monotonic() - start < 1.4


def test_data_uris_and_raw_bytes():
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    expected = np.asarray(Image.open(io.BytesIO(PNG)))
    assert np.array_equal(np.asarray(load_image(uri)), expected)
    wrapped = "data:image/png;base64," + "\n".join(base64.encodebytes(PNG).decode().split())
    assert np.array_equal(np.asarray(load_image(wrapped)), expected)
    assert np.array_equal(np.asarray(load_image(bytearray(PNG))), expected)
    with pytest.raises(MediaError, match="invalid base64"):
        load_image("data:image/png;base64,iVBORw0KGgo*&^%")
    with pytest.raises(MediaError, match="base64"):
        load_image("data:image/png,rawtext")


@pytest.mark.parametrize("data", [b"", b"not an image at all", PNG[: len(PNG) // 2], PNG[:40]],
                         ids=["empty", "garbage", "truncated", "header-only"])
def test_broken_images_raise_media_error(data):
    with pytest.raises(MediaError):
        load_image(data)


def bomb_png(width, height):
    """A valid 1-bit PNG of width x height zeros: tiny on disk, huge once decoded."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused_before_decoding():
    bomb = bomb_png(20000, 20000)  # 400 MP, about 50 KB
    assert len(bomb) < 200_000
    with pytest.raises(MediaError, match="pixels|decompression|bomb"):
        load_image(bomb)
    medium = bomb_png(3000, 2000)  # under PIL's own limit: ours must catch it
    with pytest.raises(MediaError, match="max_image_pixels"):
        load_image(medium, MediaPolicy(max_image_pixels=1_000_000))


def test_local_roots_and_path_traversal(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "ok.png").write_bytes(PNG)
    (outside / "secret.png").write_bytes(PNG)
    (root / "link.png").symlink_to(outside / "secret.png")
    policy = MediaPolicy(local_roots=(root,))
    assert load_image(str(root / "ok.png"), policy).size == (31, 17)
    assert load_image(f"file://{root}/ok.png", policy).size == (31, 17)
    for source in [f"{root}/../outside/secret.png", f"file://{root}/../outside/secret.png",
                   str(outside / "secret.png"), str(root / "link.png")]:
        with pytest.raises(MediaError, match="outside the allowed folders"):
            load_image(source, policy)
    with pytest.raises(MediaError, match="not found"):
        load_image(str(root / "missing.png"), policy)
    with pytest.raises(MediaError, match="allow_local_files"):
        load_image(str(root / "ok.png"), MediaPolicy(allow_local_files=False))
    assert open_source(root / "ok.png", MediaPolicy(), max_bytes=10**6) == (root / "ok.png").resolve()


def test_https_connects_to_the_checked_address_with_sni_and_certificate_of_the_name(tmp_path, monkeypatch):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=media.test",
                    "-addext", "subjectAltName=DNS:media.test"], check=True, capture_output=True)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    sni = []
    server_ctx.sni_callback = lambda sock, name, ctx: sni.append(name)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.socket = server_ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    real = media.socket.getaddrinfo
    monkeypatch.setattr(media.socket, "getaddrinfo", lambda host, *a, **k: real(
        "127.0.0.1" if host.endswith(".test") else host, *a, **k))
    monkeypatch.setattr(ssl, "_create_default_https_context", lambda: ssl.create_default_context(cafile=str(cert)))
    try:
        Handler.seen_hosts.clear()
        assert load_image(f"https://media.test:{port}/img.png", OPEN).size == (31, 17)
        assert sni == ["media.test"] and Handler.seen_hosts == [f"media.test:{port}"]
        with pytest.raises(MediaError, match="CERTIFICATE|certificate"):  # same address, other name
            load_image(f"https://other.test:{port}/img.png", OPEN)
    finally:
        httpd.shutdown()
        httpd.server_close()
