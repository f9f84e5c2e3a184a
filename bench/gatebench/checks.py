"""Before measuring: every front answers the test image correctly, and the TLS features
the scenarios rely on (resumption, HTTP/2) are there. A wrong answer stops the run."""

import base64
import socket
import ssl

from .configs import MANIFEST_ACCEPT
from .procs import http_get

ACCEPT = dict([MANIFEST_ACCEPT.split(": ", 1)])
from .servers import USERS, basic


class CheckError(Exception):
    pass


def answers(front, content, ca):
    """GET and HEAD of the manifest, GET of the 1 MiB blob: status, digest, length."""
    url = f"{front.url}/v2/bench/manifests/latest"
    for method in ("GET", "HEAD"):
        status, headers, body = http_get(url, cafile=ca, method=method, headers=ACCEPT)
        if status != 200:
            raise CheckError(f"{front.name} ({front.proc.name}): {method} {url} answered {status}: "
                             f"{body[:300]!r}")
        if headers.get("Docker-Content-Digest") != content.manifest_digest:
            raise CheckError(f"{front.name}: {method} {url}: Docker-Content-Digest "
                             f"{headers.get('Docker-Content-Digest')!r}, "
                             f"wanted {content.manifest_digest}")
        if method == "GET" and body != content.manifest:
            raise CheckError(f"{front.name}: GET {url}: not the manifest pushed")
    status, _, body = http_get(f"{front.url}/v2/bench/blobs/{content.small}", cafile=ca)
    if status != 200 or len(body) != content.small_size:
        raise CheckError(f"{front.name}: 1 MiB blob: status {status}, {len(body)} bytes")


def tls_features(url, ca):
    """(resumed, alpn): does a new connection resume the previous one's TLS session, and
    which protocol ALPN picks when the client offers h2 and http/1.1."""
    host, port = url.split("//", 1)[1].split(":")
    port = int(port)
    ctx = ssl.create_default_context(cafile=ca)

    def connect(session=None):
        raw = socket.create_connection((host, port), timeout=5)
        return ctx.wrap_socket(raw, server_hostname=host, session=session)

    with connect() as s:
        # Read a whole response: TLS 1.3 session tickets arrive after the handshake.
        s.sendall(f"GET /v2/ HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
                  .encode())
        try:
            while s.recv(65536):
                pass
        except (ssl.SSLEOFError, ConnectionResetError):
            pass   # closed without close_notify: the session is still good
        session = s.session
    with connect(session) as s:
        resumed = s.session_reused
    alpn_ctx = ssl.create_default_context(cafile=ca)
    alpn_ctx.set_alpn_protocols(["h2", "http/1.1"])
    with alpn_ctx.wrap_socket(socket.create_connection((host, port), timeout=5),
                              server_hostname=host) as s:
        alpn = s.selected_alpn_protocol()
    return resumed, alpn


def wrong_password(front, ca):
    """The status a front gives a known user with a wrong password (reads included)."""
    user = "pusher5"
    good = basic(user).split(": ", 1)[1]
    status_ok, _, _ = http_get(f"{front.url}/v2/bench/manifests/latest", cafile=ca,
                               headers={"Authorization": good, **ACCEPT})
    bad = "Basic " + base64.b64encode(f"{user}:{USERS[user][0]}-wrong".encode()).decode()
    status_bad, _, _ = http_get(f"{front.url}/v2/bench/manifests/latest", cafile=ca,
                                headers={"Authorization": bad, **ACCEPT})
    if status_ok != 200:
        raise CheckError(f"{front.name}: the right password answered {status_ok}")
    return status_bad
