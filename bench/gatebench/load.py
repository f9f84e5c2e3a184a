"""Load generators, each returning a `Result`: what was done, how fast, what failed.

* wrk: HTTP/1.1 keep-alive GETs over TLS (2 threads);
* ab -k -i: HTTP/1.1 keep-alive HEADs (wrk and h2load --h1 cannot parse a HEAD
  response that carries Content-Length);
* h2load: HTTP/2 streams; and connection-per-request over HTTP/1.1 — with `-c N -n N`
  every client makes one connection, so every handshake is full; with
  `Connection: close` and more requests than clients, each client reconnects and
  resumes its previous TLS session (h2load keeps it), so handshakes are resumed;
* curl: one big download, and the upload sequence POST, (PATCH…), PUT ?digest=;
  `curl --parallel` (curl_many) for many requests at once, redirects followed where
  asked (wrk follows none).
"""

import os
import re
import subprocess
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field


@dataclass
class Result:
    count: float = 0          # requests, connections or bytes done
    seconds: float = 0.0      # wall time the client measured
    errors: list = field(default_factory=list)

    @property
    def rate(self):
        return self.count / self.seconds if self.seconds > 0 else 0.0


class LoadError(Exception):
    pass


def _run(argv, timeout):
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LoadError(f"{argv[0]} did not finish within {timeout:.0f} s: {' '.join(argv)}")
    if done.returncode != 0:
        raise LoadError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done.stdout + done.stderr


def _num(pattern, text, default=None, cast=float):
    m = re.search(pattern, text)
    if not m:
        if default is not None:
            return default
        raise LoadError(f"cannot find {pattern!r} in:\n{text}")
    return cast(m.group(1))


def wrk(url, connections, seconds, headers=(), timeout_s=10):
    argv = ["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s",
            "--timeout", f"{timeout_s}s", *_headers(headers)]
    out = _run(argv + [url], timeout=seconds + timeout_s + 30)
    res = Result(count=_num(r"(\d+) requests in", out, cast=int),
                 seconds=_num(r"requests in ([\d.]+)s", out))
    non2xx = _num(r"Non-2xx or 3xx responses: (\d+)", out, default=0, cast=int)
    if non2xx:
        res.errors.append(f"{non2xx} non-2xx responses")
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m and any(int(x) for x in m.groups()):
        res.errors.append("socket errors: " + m.group(0))
    return res


def ab_head(url, connections, seconds, headers=()):
    argv = ["ab", "-q", "-k", "-i", "-c", str(connections), "-t", str(seconds),
            "-n", "100000000"]
    for h in headers:
        argv += ["-H", h]
    argv.append(url)
    out = _run(argv, timeout=seconds + 60)
    res = Result(count=_num(r"Complete requests:\s+(\d+)", out, cast=int),
                 seconds=_num(r"Time taken for tests:\s+([\d.]+)", out))
    failed = _num(r"Failed requests:\s+(\d+)", out, default=0, cast=int)
    non2xx = _num(r"Non-2xx responses:\s+(\d+)", out, default=0, cast=int)
    if failed:
        res.errors.append(f"{failed} failed requests")
    if non2xx:
        res.errors.append(f"{non2xx} non-2xx responses")
    return res


def _h2load(argv, timeout):
    out = _run(["h2load", *argv], timeout=timeout)
    succeeded = _num(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", out, cast=int)
    total = _num(r"requests: (\d+) total", out, cast=int)
    secs = _num(r"finished in ([\d.]+)(?:s|ms)", out)
    if re.search(r"finished in [\d.]+ms", out):
        secs /= 1000
    res = Result(count=succeeded, seconds=secs)
    statuses = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    bad = int(statuses.group(3)) + int(statuses.group(4)) if statuses else 0
    if succeeded < total or bad:
        res.errors.append(f"{total - succeeded} of {total} requests failed, "
                          f"{bad} 4xx/5xx ({re.search(r'requests: .*', out).group(0)})")
    return res


def _headers(headers):
    return [arg for h in headers for arg in ("-H", h)]


def h2load_streams(url, clients, streams, seconds, headers=()):
    """HTTP/2: `clients` connections × `streams` concurrent streams, for `seconds`."""
    return _h2load(["-t", "2", "-c", str(clients), "-m", str(streams), "-D", str(seconds),
                    *_headers(headers), url], timeout=seconds + 60)


def h2load_handshakes(url, connections, resumed, headers=(), clients=32):
    """HTTP/1.1, one request per TLS connection; conn/s = requests/s.

    Full: `connections` clients, one request each (no session to resume).
    Resumed: `clients` clients reconnecting with `Connection: close`, each resuming
    the session of its previous connection (all but the first `clients` handshakes).
    """
    if resumed:
        argv = ["--h1", "-t", "2", "-c", str(clients), "-n", str(connections),
                "-H", "Connection: close", *_headers(headers), url]
    else:
        argv = ["--h1", "-t", "2", "-c", str(connections), "-n", str(connections),
                *_headers(headers), url]
    return _h2load(argv, timeout=300)


def _curl_base(cafile):
    argv = ["curl", "--silent", "--show-error", "--http1.1", "--max-time", "600"]
    return argv + ["--cacert", cafile] if cafile else argv


def download(url, expect_size, cafile):
    out = _run(_curl_base(cafile) + ["-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}",
                                     url], timeout=660)
    code, size, secs = out.split()[-3:]
    res = Result(count=int(size), seconds=float(secs))
    if code != "200" or int(size) != expect_size:
        res.errors.append(f"download {url}: status {code}, {size} of {expect_size} bytes")
    return res


def _curl_step(argv, headers_file, want):
    out = _run(argv + ["-D", headers_file, "-o", "/dev/null", "-w", "%{http_code}"], timeout=660)
    code = out.strip().split()[-1]
    if code not in want:
        raise LoadError(f"{' '.join(argv)} answered {code}, wanted {'/'.join(want)}")
    location = None
    with open(headers_file, errors="replace") as f:
        for line in f:
            if line.lower().startswith("location:"):
                location = line.split(":", 1)[1].strip()
    return location


def upload(base, repo, digest, size, cafile, auth_header, headers_file, whole=None, chunks=None):
    """Push one blob: POST, then either PUT with the whole file as body, or one PATCH per
    chunk (path, start, end) and an empty PUT. The server verifies the digest.
    Returns a Result in bytes."""
    curl = _curl_base(cafile) + ["-H", "Expect:"]
    if auth_header:
        curl += ["-H", auth_header]
    started = time.monotonic()
    url = f"{base}/v2/{repo}/blobs/uploads/"
    loc = _curl_step(curl + ["-X", "POST", "--data-binary", "", url], headers_file, {"202"})
    if not loc:
        raise LoadError(f"POST {url}: no Location")
    loc = urllib.parse.urljoin(url, loc)
    if chunks:
        for path, start, end in chunks:
            loc = urllib.parse.urljoin(loc, _curl_step(
                curl + ["-X", "PATCH", "-T", path, "-H", "Content-Type: application/octet-stream",
                        "-H", f"Content-Range: {start}-{end - 1}", loc],
                headers_file, {"202"}) or loc)
        body = ["--data-binary", ""]
    else:
        body = ["-T", whole, "-H", "Content-Type: application/octet-stream"]
    sep = "&" if "?" in loc else "?"
    _curl_step(curl + ["-X", "PUT", *body, f"{loc}{sep}digest={digest}"], headers_file, {"201"})
    return Result(count=size, seconds=time.monotonic() - started)


def put_manifest(base, repo, tag, path, media_type, cafile, auth_header, headers_file):
    curl = _curl_base(cafile) + ["-H", f"Content-Type: {media_type}"]
    if auth_header:
        curl += ["-H", auth_header]
    _curl_step(curl + ["-X", "PUT", "--data-binary", f"@{path}",
                       f"{base}/v2/{repo}/manifests/{tag}"], headers_file, {"201"})


@dataclass
class Op:
    """One request of a `curl_many` run."""
    url: str
    method: str = "GET"
    data: str = None          # a file sent as the body
    headers: list = field(default_factory=list)


def _quoted(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def curl_many(ops, parallel, cafile, want=("200",), bytes_each=None, unit_pairs=False,
              follow=False):
    """Every op once, `parallel` at a time over HTTP/1.1 keep-alive connections (one
    `curl --parallel` process; `follow`: redirects followed, as for a registry answering
    blob GETs with 307 to its store). The count is requests, pairs of requests
    (`unit_pairs`) or bytes (`bytes_each` per request, each answer checked to be that
    long); the time is the wall time of the curl process."""
    lines = []
    for i, op in enumerate(ops):
        if i:
            lines.append("next")
        lines += ["http1.1", "silent", "show-error", "output = /dev/null",
                  'write-out = "%{http_code} %{size_download}\\n"']
        if follow:
            lines.append("location")
        if cafile:
            lines.append(f"cacert = {_quoted(cafile)}")
        if op.method == "HEAD":
            lines.append("head")
        elif op.method != "GET":
            lines.append(f"request = {op.method}")
        if op.data:
            lines.append(f"data-binary = {_quoted('@' + op.data)}")
            lines.append('header = "Expect:"')
        for h in op.headers:
            lines.append(f"header = {_quoted(h)}")
        lines.append(f"url = {_quoted(op.url)}")
    with tempfile.NamedTemporaryFile("w", prefix="bench-curl-", suffix=".conf") as conf:
        conf.write("\n".join(lines) + "\n")
        conf.flush()
        started = time.monotonic()
        try:
            # Only stdout: with --parallel, curl 7.88 prints its progress meter to
            # stderr even when told to be silent.
            done = subprocess.run(["curl", "--no-progress-meter", "--parallel",
                                   "--parallel-immediate", "--parallel-max", str(parallel),
                                   "--config", conf.name],
                                  capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise LoadError(f"curl --parallel ({len(ops)} requests) did not finish within 600 s")
        seconds = time.monotonic() - started
    answers = [line.split() for line in done.stdout.splitlines() if line.strip()]
    good = [a for a in answers if a[0] in want
            and (bytes_each is None or a[1:] == [str(bytes_each)])]
    res = Result(seconds=seconds)
    if len(answers) != len(ops) or len(good) != len(ops) or done.returncode != 0:
        bad = sorted({" ".join(a) for a in answers if a not in good})
        res.errors.append(f"curl --parallel: {len(good)} of {len(ops)} requests answered "
                          f"{'/'.join(want)}{f' with {bytes_each} bytes' if bytes_each else ''}"
                          f" (others: {bad[:3]}), exit {done.returncode}: "
                          f"{done.stderr.strip()[-300:]}")
    n = len(good)
    res.count = n / 2 if unit_pairs else (n * bytes_each if bytes_each else n)
    return res
