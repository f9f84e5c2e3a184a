"""The S3 scenarios of issue 11: registry-gate keeping the registry in a real three-node
Garage cluster (tests/garage/cluster.sh, replication factor 3), against Debian's
docker-registry (CNCF distribution 2.8) with its `s3-aws` driver on the same cluster,
bucket and key prefix (both use distribution's layout, so what is pushed once is
served by all of them):

    Garage node 1 ◄── gate-s3            registry-gate, TLS
                  ◄── dist-s3            docker-registry s3-aws, plain HTTP, redirect off
                  ◄── dist-s3-redirect   the same with redirect on: a blob GET is a 307
                                         to a presigned URL of node 1
    Garage node 2 ◄── gate-s3-2          a second gate; gate-s3x2 = gate-s3 + gate-s3-2

Everything here is self-contained (servers, configs, scenarios, the Garage CPU meter,
the targets) so that bench/run only needs a few hooks. Garage's CPU is the utime+stime
of its three processes during each run, put next to the front's own.
"""

import http.client
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass

from . import checks, load, report
from .configs import MANIFEST_ACCEPT, MANIFEST_TYPE
from .procs import StartError, cpu_seconds, free_port, wait_http
from .scenarios import GIB, Scenario, workdir_free_gib
from .servers import Front, basic
from .setup import SetupError, UploadSource

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLUSTER_SH = os.path.join(REPO, "tests", "garage", "cluster.sh")
GARAGE_VERSION = "2.5.0"   # what .ci/run installs
INSTALL = f"cargo install garage --locked --version {GARAGE_VERSION}"

KEYS = ["s3-get-c32", "s3-upload-mono", "s3-upload-chunked", "s3-big", "s3-50x1m"]
PREFIX = "bench"            # the key prefix in the bucket (distribution's rootdirectory)
PUSHER = "pusher5"


def wanted(only):
    """Whether `--only` (None: everything) selects any S3 scenario."""
    if not only:
        return True
    words = [w.strip() for w in only.split(",") if w.strip()]
    return any(w in key for w in words for key in KEYS)


def check_garage():
    """Stop the run, like check_tools, when garage is not on PATH; its version line."""
    if shutil.which("garage") is None:
        raise SetupError("missing: garage (the S3-compatible object store of the s3-* "
                         f"scenarios)\ninstall: {INSTALL}  (~/.cargo/bin on PATH; or "
                         "leave the S3 scenarios out with --only)")
    out = subprocess.run(["garage", "--version"], capture_output=True, text=True)
    return (out.stdout + out.stderr).strip().splitlines()[0] if out.stdout else "garage ?"


def need_gib(sizes):
    """Disk the S3 part needs under the work dir: every blob three times (replication
    3), and a second upload source for the two-gate monolithic uploads."""
    return (3 * (sizes.big + (1 << 20)) + 8 * sizes.upload) / GIB + 0.5


# The processes.

class GarageCluster:
    """tests/garage/cluster.sh as one supervised "process": started by Supervisor.start,
    stopped by stop_all (and by the script's own watchdog when bench/run dies)."""

    def __init__(self, dir, log):
        self.name, self.dir, self.log = "garage", dir, log
        self.port = None
        self.pids = []
        self.env = {}

    def start(self):
        try:
            done = subprocess.run([CLUSTER_SH, "start", self.dir, "--watch", str(os.getpid())],
                                  capture_output=True, text=True, timeout=180)
        except subprocess.TimeoutExpired:
            raise StartError(f"tests/garage/cluster.sh start {self.dir} took over 180 s")
        with open(self.log, "a") as f:
            f.write(done.stderr)
        if done.returncode != 0:
            raise StartError(f"tests/garage/cluster.sh start failed ({done.returncode}):\n"
                             f"{done.stderr}{done.stdout}")
        for line in done.stdout.splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                self.env[k] = v.strip('"')
        self.dir = self.env.get("GARAGE_DIR", self.dir)   # absolute
        self.pids = [int(p) for p in self.env["GARAGE_PIDS"].split()]
        self.endpoints = [self.env["S3_ENDPOINT"], self.env["S3_ENDPOINT_2"],
                          self.env["S3_ENDPOINT_3"]]
        self.port = int(self.endpoints[0].rsplit(":", 1)[1])

    def wait_listening(self, timeout=30.0):
        pass   # the script returns once the three nodes are connected and healthy

    def alive(self):
        return bool(self.pids) and all(os.path.exists(f"/proc/{p}") for p in self.pids)

    def stop(self):
        if not self.pids:
            return
        subprocess.run([CLUSTER_SH, "stop", self.dir], capture_output=True, timeout=60)
        # The script finds the nodes by their pid files; should those be gone (the work
        # dir removed under a running bench), stop the nodes by the PIDs it printed,
        # those still running this cluster's config.
        left = [p for p in self.pids if self._ours(p)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in left:
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(self._ours(p) for p in left):
                time.sleep(0.1)
            left = [p for p in left if self._ours(p)]
            if not left:
                break
        self.pids = []

    def _ours(self, pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return self.dir.encode() in f.read()
        except OSError:
            return False

    def cpu_seconds(self):
        return sum(cpu_seconds(p) for p in self.pids)


class ProcGroup:
    """The two gates measured as one front: CPU summed, RSS the larger of the two."""

    def __init__(self, name, procs):
        self.name, self.procs = name, procs
        self.log = procs[0].log

    @property
    def pid(self):
        return self.procs[0].pid

    def alive(self):
        return all(p.alive() for p in self.procs)

    def cpu_seconds(self):
        return sum(p.cpu_seconds() for p in self.procs)

    def reset_peak_rss(self):
        for p in self.procs:
            p.reset_peak_rss()

    def peak_rss_kib(self):
        return max(p.peak_rss_kib() for p in self.procs)

    def rss_kib(self):
        return max(p.rss_kib() for p in self.procs)


@dataclass
class S3Front(Front):
    """A front and the base URL of each of its gates (two for gate-s3x2)."""
    urls: tuple = ()


def gate_backend(endpoint, region, bucket, key_id, secret_file):
    """The gate's [storage] sections on the bucket."""
    return f"""\
[storage]
delete = true

[storage.s3]
endpoint = "{endpoint}"
region = "{region}"
bucket = "{bucket}"
prefix = "{PREFIX}"
access_key_id = "{key_id}"
secret_access_key_file = "{secret_file}"
redirect = false
"""


def registry_driver(endpoint, region, bucket, key_id, secret, redirect):
    """docker-registry's storage lines for its s3-aws driver (as tests/common/garage.rs
    writes them)."""
    return f"""\
  s3:
    accesskey: {key_id}
    secretkey: {secret}
    region: {region}
    regionendpoint: {endpoint}
    bucket: {bucket}
    rootdirectory: /{PREFIX}
    forcepathstyle: true
    secure: false
    v4auth: true
  redirect:
    disable: {'false' if redirect else 'true'}
"""


class S3Servers:
    """The S3 fronts, started through the run's `Servers` (its supervisor, work dir,
    certificates and users)."""

    def __init__(self, servers):
        self.servers = servers
        self.work, self.content, self.ca = servers.work, servers.content, servers.ca

    def _gate(self, name, endpoint):
        g = self.garage
        return self.servers._gate(name, "ec", backend=gate_backend(
            endpoint, g.env["S3_REGION"], g.env["S3_BUCKET"], g.env["S3_ACCESS_KEY_ID"],
            self.secret_file))

    def _registry(self, name, endpoint, redirect):
        g = self.garage
        return self.servers._registry(name, free_port(), driver=registry_driver(
            endpoint, g.env["S3_REGION"], g.env["S3_BUCKET"], g.env["S3_ACCESS_KEY_ID"],
            g.env["S3_SECRET_ACCESS_KEY"], redirect))

    def start(self, say, sizes):
        if workdir_free_gib(self.work) < need_gib(sizes):
            raise SetupError(f"{self.work}: less than {need_gib(sizes):.1f} GiB free for Garage")
        say(f"== S3: starting a three-node Garage cluster ({check_garage()})")
        t0 = time.monotonic()
        self.garage = self.servers.sup.start(GarageCluster(f"{self.work}/garage",
                                                   f"{self.work}/logs/garage.log"))
        say(f"  Garage up in {time.monotonic() - t0:.1f} s: S3 on "
            + ", ".join(e.split("//", 1)[1] for e in self.garage.endpoints)
            + f", processes {' '.join(map(str, self.garage.pids))}, "
            f"data under {self.garage.dir}")
        self.secret_file = self.servers._conf("s3-secret", self.garage.env["S3_SECRET_ACCESS_KEY"] + "\n",
                                      mode=0o600)
        ep = self.garage.endpoints
        url = lambda proc: f"https://127.0.0.1:{proc.port}"
        # The image goes in through a gate of its own, stopped afterwards: the memory an
        # upload leaves with a process (allocator caches) would otherwise show in the
        # measured gates' peak RSS.
        pusher = self._gate("gate-s3-push", ep[2])
        t0 = time.monotonic()
        self.push(url(pusher))
        pusher.stop()
        say(f"  pushed the test image ({(self.content.big_size + self.content.small_size) >> 20}"
            f" MiB) through a throw-away gate (node 3) in {time.monotonic() - t0:.1f} s")
        self.gate1 = self._gate("gate-s3", ep[0])
        self.gate2 = self._gate("gate-s3-2", ep[1])
        self.dist = self._registry("dist-s3", ep[0], redirect=False)
        self.dist_redirect = self._registry("dist-s3-redirect", ep[0], redirect=True)
        http = lambda proc: f"http://127.0.0.1:{proc.port}"
        u1, u2 = url(self.gate1), url(self.gate2)
        self.gate = S3Front("gate-s3", u1, self.gate1, (u1,))
        self.gates = S3Front("gate-s3x2", u1, ProcGroup("gate-s3x2", [self.gate1, self.gate2]),
                             (u1, u2))
        self.dist_front = S3Front("dist-s3", http(self.dist), self.dist, (http(self.dist),))
        self.redirect_front = S3Front("dist-s3-redirect", http(self.dist_redirect),
                                      self.dist_redirect, (http(self.dist_redirect),))
        say(f"  started gate-s3:{self.gate1.port} (node 1), gate-s3-2:{self.gate2.port} "
            f"(node 2), dist-s3:{self.dist.port}, dist-s3-redirect:{self.dist_redirect.port} "
            f"(node 1)")
        self.check(say)
        self.meter = GarageMeter(self.garage)
        return self

    def push(self, base):
        c, hdr, auth = self.content, f"{self.work}/push-s3.headers", basic(PUSHER)
        for digest in c.blobs():
            load.upload(base, "bench", digest, os.path.getsize(c.path(digest)), self.ca, auth,
                        hdr, whole=c.path(digest))
        load.put_manifest(base, "bench", "latest", f"{c.dir}/manifest.json", MANIFEST_TYPE,
                          self.ca, auth, hdr)

    def fronts(self):
        return [self.gate, self.gates, self.dist_front, self.redirect_front]

    def check(self, say):
        """Every gate and both registries serve the image; the redirect front redirects."""
        accept = dict([MANIFEST_ACCEPT.split(": ", 1)])
        singles = [Front("gate-s3", self.gate.urls[0], self.gate1),
                   Front("gate-s3-2", self.gates.urls[1], self.gate2),
                   self.dist_front, self.redirect_front]
        for f in singles:
            wait_http(f"{f.url}/v2/bench/manifests/latest", f.proc, cafile=self.ca,
                      headers=accept)
            checks.answers(f, self.content, self.ca)   # urllib follows the 307
        status, location = status_no_follow(
            f"{self.redirect_front.url}/v2/bench/blobs/{self.content.small}")
        node1 = self.garage.endpoints[0]
        if status != 307 or not location.startswith(node1):
            raise checks.CheckError(f"dist-s3-redirect: a blob GET answered {status} "
                                    f"(Location {location!r}), wanted 307 to {node1}")
        status, _ = status_no_follow(f"{self.dist_front.url}/v2/bench/blobs/{self.content.small}")
        if status != 200:
            raise checks.CheckError(f"dist-s3: a blob GET answered {status}, wanted 200")
        say("  every S3 front serves the manifest (GET, HEAD) and the 1 MiB blob; "
            "dist-s3-redirect answers blob GETs 307 to Garage node 1")


def status_no_follow(url):
    """(status, Location) of a plain-HTTP GET, redirects not followed."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request("GET", u.path + (f"?{u.query}" if u.query else ""))
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("Location") or ""
    finally:
        conn.close()


# Garage's CPU next to the front's.

class GarageMeter:
    """The CPU seconds of the three Garage processes during each run, per scenario and
    front, in run order (the n-th run of a front in a scenario is its round n)."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.runs = {}   # (key, front) -> [(cpu seconds, count, ok)]

    def wrap(self, key, fn):
        def run(f):
            before = self.cluster.cpu_seconds()
            res = None
            try:
                res = fn(f)
                return res
            finally:
                cpu = self.cluster.cpu_seconds() - before
                ok = res is not None and not res.errors
                self.runs.setdefault((key, f.name), []).append(
                    (cpu, res.count if res else 0, ok))
        return run

    def per_unit(self, key, front, per_gib):
        """Median Garage CPU per unit over the front's good runs (µs/req or s/GiB)."""
        vals = sorted(cpu / (count / GIB) if per_gib else cpu / count * 1e6
                      for cpu, count, ok in self.runs.get((key, front), []) if ok and count)
        if not vals:
            return None
        n = len(vals)
        return vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) / 2

    def as_json(self):
        return {f"{k} {f}": [{"garage_cpu": c, "count": n, "ok": ok} for c, n, ok in v]
                for (k, f), v in self.runs.items()}


# Load through one front or both gates.

def _together(jobs):
    """Run the callables at the same time; their results, or the first LoadError."""
    results, errors = [None] * len(jobs), []

    def one(i, job):
        try:
            results[i] = job()
        except load.LoadError as e:
            errors.append(e)
    threads = [threading.Thread(target=one, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _summed(results, seconds):
    out = load.Result(count=sum(r.count for r in results), seconds=seconds)
    for r in results:
        out.errors += r.errors
    return out


def wrk_split(f, path, connections, seconds, headers):
    """wrk on one gate, or one wrk per gate with the connections split, at the same time
    (requests summed; each wrk times itself, the longer time is taken)."""
    if len(f.urls) == 1:
        return load.wrk(f.urls[0] + path, connections, seconds, headers)
    each = connections // len(f.urls)
    results = _together([lambda u=u: load.wrk(u + path, each, seconds, headers)
                         for u in f.urls])
    return _summed(results, max(r.seconds for r in results))


def upload_alternating(bases, repo, digest, size, cafile, auth_header, headers_file, chunks):
    """POST on the first gate, then each PATCH and the final PUT on the next gate in turn:
    the upload session moves between gates (its state is in the bucket)."""
    curl = load._curl_base(cafile) + ["-H", "Expect:", "-H", auth_header]
    turn = iter(range(1, 1 << 30))
    on = lambda loc: bases[next(turn) % len(bases)] + _path(loc)
    started = time.monotonic()
    loc = load._curl_step(curl + ["-X", "POST", "--data-binary", "",
                                  f"{bases[0]}/v2/{repo}/blobs/uploads/"], headers_file, {"202"})
    for path, start, end in chunks:
        loc = load._curl_step(curl + [
            "-X", "PATCH", "-T", path, "-H", "Content-Type: application/octet-stream",
            "-H", f"Content-Range: {start}-{end - 1}", on(loc)], headers_file, {"202"}) or loc
    url = on(loc)
    sep = "&" if "?" in url else "?"
    load._curl_step(curl + ["-X", "PUT", "--data-binary", "", f"{url}{sep}digest={digest}"],
                    headers_file, {"201"})
    return load.Result(count=size, seconds=time.monotonic() - started)


def _path(location):
    u = urllib.parse.urlsplit(location)
    return u.path + (f"?{u.query}" if u.query else "")


def build(s3, content, upload_source, sizes, ca):
    """The S3 scenarios: the issue's, downloads before uploads. Anchor: dist-s3."""
    s, m = sizes, s3.meter
    gate, gates, dist, redirect = s3.fronts()
    acc = [MANIFEST_ACCEPT]
    manifest = "/v2/bench/manifests/latest"
    blob = lambda digest: f"/v2/bench/blobs/{digest}"
    scenarios = []

    def add(key, title, fronts, run, unit, **kw):
        scenarios.append(Scenario(key, title, fronts, m.wrap(key, run), unit, "dist-s3", **kw))

    add("s3-get-c32", "S3: manifest GET, HTTP/1.1 keep-alive, 32 connections (wrk; two gates: "
        "two wrk -c 16 at once, one per gate, summed)",
        [gate, gates, dist], lambda f: wrk_split(f, manifest, 32, s.seconds, acc), "req/s",
        warmup=(lambda f: wrk_split(f, manifest, 32, s.warmup, acc)) if s.warmup else None)

    # Downloads before uploads: the memory an upload leaves with a gate (allocator
    # caches; parts of 8 MiB, two in flight) would show in the peak RSS of the 1 GiB
    # download, the flat-memory target. curl --parallel --location for every front, so
    # that the redirecting registry is loaded by the same client as the others.
    def downloads(f, digest, size, per_url, parallel):
        ops = [load.Op(u + blob(digest)) for _ in range(per_url) for u in f.urls]
        return load.curl_many(ops, parallel, ca, bytes_each=size, follow=True)

    small_warm = lambda f: downloads(f, content.small, content.small_size, 1, 2)
    add("s3-big", f"S3: {content.big_size >> 20} MiB blob download, HTTP/1.1 (curl -L; two "
        f"gates: one download from each at once); RSS sampled every 20 ms",
        [gate, gates, dist, redirect],
        lambda f: downloads(f, content.big, content.big_size, 1, 2), "MB/s",
        sample_rss=True, warmup=small_warm)
    transfers = 50 * 5 * s.seconds
    add("s3-50x1m", f"S3: {transfers} downloads of a 1 MiB blob, 50 at a time (curl --parallel "
        f"-L, keep-alive: wrk cannot follow the redirect; two gates: alternating URLs)",
        [gate, gates, dist, redirect],
        lambda f: downloads(f, content.small, content.small_size, transfers // len(f.urls), 50),
        "MB/s", warmup=small_warm)

    # Uploads: the second source lets the two-gate monolithic row push two blobs at once;
    # it is made (256 MiB on disk) by the scenario's warm-up, outside the measurement.
    second = []

    def second_source():
        if not second:
            second.append(UploadSource(f"{s3.work}/upload-s3b", upload_source.size))
        return second[0]
    auth = lambda f: None if f.name.startswith("dist") else basic(PUSHER)
    hdr = f"{s3.work}/upload-s3"

    def upload(f, src, base, chunked, n=0):
        return load.upload(base, "bench-upload", src.next_digest(), src.size, ca, auth(f),
                           f"{hdr}-{n}.headers", whole=src.whole,
                           chunks=src.chunks if chunked else None)

    def mono(f):
        if len(f.urls) == 1:
            return upload(f, upload_source, f.url, False)
        started = time.monotonic()
        results = _together([lambda: upload(f, upload_source, f.urls[0], False, 0),
                             lambda: upload(f, second_source(), f.urls[1], False, 1)])
        return _summed(results, time.monotonic() - started)

    def chunked(f):
        if len(f.urls) == 1:
            return upload(f, upload_source, f.url, True)
        return upload_alternating(list(f.urls), "bench-upload", upload_source.next_digest(),
                                  upload_source.size, ca, auth(f), f"{hdr}-0.headers",
                                  upload_source.chunks)

    mib = upload_source.size >> 20
    add("s3-upload-mono", f"S3: {mib} MiB blob upload, monolithic POST + PUT, digest verified "
        f"(curl; two gates: two uploads at once, one per gate, bytes of both)",
        [gate, gates, dist], mono, "MB/s",
        warmup=lambda f: second_source() if len(f.urls) > 1 else None)
    add("s3-upload-chunked", f"S3: {mib} MiB blob upload, 3 PATCH chunks + PUT, digest verified "
        f"(curl; two gates: POST, PATCHes and PUT alternate between them)",
        [gate, gates, dist], chunked, "MB/s")
    return scenarios


def is_s3(sc):
    return sc.key.startswith("s3-")


# The report.

def scenario_table(results, sc, rounds, meter):
    """The usual table, then Garage's CPU per unit for each front's runs."""
    table = report.scenario_table(results, sc, rounds)
    if meter is None or not is_s3(sc):
        return table
    table = _align(table, [f.name for f in sc.fronts])
    unit = "s/GiB" if sc.per_gib else f"µs/{sc.unit.split('/')[0]}"
    cells = []
    for f in sc.fronts:
        v = meter.per_unit(sc.key, f.name, sc.per_gib)
        shown = "-" if v is None else (f"{v:.2f}" if sc.per_gib else f"{v:,.0f}")
        cells.append(f"{f.name} {shown}")
    lines = [table, f"  Garage CPU, its 3 processes, {unit}: " + ", ".join(cells)]
    # What a front held before its run and its peak during it (the round where it rose
    # most): memory an earlier scenario left with a process shows here.
    rss = []
    for f in sc.fronts:
        runs = [r for r in results.runs.get(sc.key, []) if r.front == f.name]
        if runs:
            worst = max(runs, key=lambda r: r.peak_rss_kib - r.idle_rss_kib)
            rss.append(f"{f.name} {worst.idle_rss_kib / 1024:.0f} -> "
                       f"{worst.peak_rss_kib / 1024:.0f}")
    lines.append("  RSS before the run -> peak during it, MiB, the round it rose most: "
                 + ", ".join(rss))
    lines.append("  (gate-s3x2: CPU of both gates summed, RSS the larger of the two)")
    return "\n".join(lines)


def _align(table, names, width=14):
    """report's front column is 14 wide: take the spaces a longer name (dist-s3-redirect)
    overflows by from the padding of the column after it."""
    out = []
    for line in table.splitlines():
        for name in names:
            extra = len(name) - width
            if extra > 0 and line.startswith(f"  {name}{' ' * (extra + 1)}"):
                line = f"  {name}" + line[2 + len(name) + extra:]
        out.append(line)
    return "\n".join(out)


def targets(results):
    t = report.Targets(results)
    r = results
    for key, what in (("s3-get-c32", "manifest GET c32"), ("s3-upload-mono", "upload, monolithic"),
                      ("s3-upload-chunked", "upload, 3 chunks"), ("s3-big", "big download"),
                      ("s3-50x1m", "50 x 1 MiB")):
        t.ratio_at_least(f"S3 {what}: gate-s3 / dist-s3", key, "gate-s3", "dist-s3", 1.5)
        if r.has(key, "dist-s3-redirect"):
            t.ratio_at_least(f"S3 {what}: gate-s3 / dist-s3-redirect", key, "gate-s3",
                             "dist-s3-redirect", 1.5)
    t.ratio_at_least("S3 manifest GET c32: gate-s3x2 / gate-s3", "s3-get-c32", "gate-s3x2",
                     "gate-s3", 1.6)
    t.mib_at_most("S3 memory: gate-s3 peak RSS during the big download", "s3-big",
                  r.peak_rss_mib("s3-big", "gate-s3") if r.has("s3-big", "gate-s3") else None, 40)
    return t
