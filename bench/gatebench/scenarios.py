"""The scenarios of issue 5 and the loop that runs them.

Each scenario runs every front once per round; the order rotates from round to round
so that no front always goes first (or right after the heaviest one). A ratio between
two fronts is the median over rounds of the ratio within one round: drift on a shared
machine moves both sides of a round together.
"""

import os
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

from . import load
from .configs import MANIFEST_ACCEPT
from .procs import Probe
from .servers import basic

GIB = 1 << 30


@dataclass
class Sizes:
    rounds: int
    seconds: int          # each throughput run
    warmup: int           # untimed run per front before the first round (0: none)
    big: int              # the big blob, bytes
    upload: int           # the uploaded blob, bytes
    full_handshakes: int  # connections per full-handshake run
    resumed_handshakes: int


DEFAULT = Sizes(rounds=3, seconds=2, warmup=1, big=GIB, upload=256 << 20,
                full_handshakes=1000, resumed_handshakes=2000)
QUICK = Sizes(rounds=1, seconds=1, warmup=0, big=64 << 20, upload=16 << 20,
              full_handshakes=200, resumed_handshakes=400)


@dataclass
class Scenario:
    key: str
    title: str
    fronts: list
    run: Callable                  # front -> load.Result
    unit: str                      # "req/s", "conn/s" or "MB/s"
    anchor: str                    # ratios are taken against this front
    sample_rss: bool = False       # watch RSS during the run (flat-memory check)
    warmup: Optional[Callable] = None
    after: Optional[Callable] = None   # after each run, outside the measurement

    @property
    def per_gib(self):
        return self.unit == "MB/s"


@dataclass
class Run:
    front: str
    round: int
    rate: Optional[float]          # in the scenario's unit; None when the run failed
    count: float                   # requests, connections or bytes
    cpu: float                     # seconds of the front's CPU during the run
    peak_rss_kib: int
    idle_rss_kib: int              # just before the run
    max_rss_kib: int               # highest sampled during the run (sample_rss)
    errors: list = field(default_factory=list)

    def cpu_per_unit(self, per_gib):
        if not self.count:
            return None
        return self.cpu / (self.count / GIB) if per_gib else self.cpu / self.count * 1e6


def build(servers, content, upload_source, sizes, ca):
    """The scenario list, in the issue's order."""
    s = sizes
    manifest = lambda f: f"{f.url}/v2/bench/manifests/latest"
    small = lambda f: f"{f.url}/v2/bench/blobs/{content.small}"
    big = lambda f: f"{f.url}/v2/bench/blobs/{content.big}"
    with_apache = lambda fronts, apache: fronts + ([apache] if apache else [])
    stub = servers.stub_fronts
    gate_ka = [stub[0], stub[2]]
    acc = [MANIFEST_ACCEPT]
    wrk_warm = lambda url, c: (lambda f: load.wrk(url(f), c, s.warmup, acc)) \
        if s.warmup else None

    def wrk(url, c, hdr=acc):
        return lambda f: load.wrk(url(f), c, s.seconds, hdr)

    def small_download(f):
        load.download(small(f), content.small_size, ca)

    def wrk_bytes(url, c, size):
        def run(f):
            r = load.wrk(url(f), c, s.seconds)
            r.count *= size
            return r
        return run

    scenarios = [
        Scenario("stub-get-c32", "stub: manifest GET, HTTP/1.1 keep-alive, 32 connections (wrk)",
                 with_apache(stub, servers.apache_stub), wrk(manifest, 32), "req/s", "nginx-ka",
                 warmup=wrk_warm(manifest, 32)),
        Scenario("stub-head-c32", "stub: manifest HEAD, HTTP/1.1 keep-alive, 32 connections (ab -k)",
                 stub, lambda f: load.ab_head(manifest(f), 32, s.seconds, acc), "req/s", "nginx-ka"),
        Scenario("stub-get-c64", "stub: manifest GET, HTTP/1.1 keep-alive, 64 connections (wrk)",
                 stub, wrk(manifest, 64), "req/s", "nginx-ka", warmup=wrk_warm(manifest, 64)),
        Scenario("stub-h2", "stub: manifest GET, HTTP/2, 16 connections x 4 streams (h2load)",
                 gate_ka, lambda f: load.h2load_streams(manifest(f), 16, 4, s.seconds, acc),
                 "req/s", "nginx-ka",
                 warmup=(lambda f: load.h2load_streams(manifest(f), 16, 4, s.warmup, acc))
                 if s.warmup else None),
    ]
    for user, cost in (("pusher5", 5), ("pusher10", 10)):
        scenarios.append(Scenario(
            f"auth-bcrypt{cost}", f"stub: manifest GET with Basic credentials, bcrypt cost {cost}, "
            f"32 connections (wrk)",
            gate_ka, lambda f, user=user: load.wrk(manifest(f), 32, max(s.seconds, 2),
                                                   acc + [basic(user)]),
            "req/s", "nginx-ka"))

    scenarios.append(Scenario(
        "stub-big", f"stub: {content.big_size >> 20} MiB blob download, HTTP/1.1 (curl)",
        stub, lambda f: load.download(big(f), content.big_size, ca), "MB/s", "nginx-recipe",
        sample_rss=True, warmup=small_download))
    scenarios.append(Scenario(
        "stub-50x1m", "stub: 50 concurrent 1 MiB blob downloads, keep-alive (wrk -c 50)",
        with_apache(stub, servers.apache_stub), wrk_bytes(small, 50, content.small_size),
        "MB/s", "nginx-recipe"))

    # The handshake bursts come after the memory-sensitive transfers: the memory of
    # 1,000+ simultaneous connections stays with a process (allocator caches), so the
    # peak RSS of a later scenario would carry it.
    for cert, fronts in (("ECDSA P-256", gate_ka), ("RSA-2048", servers.stub_rsa_fronts)):
        tag = "ecdsa" if cert.startswith("ECDSA") else "rsa"
        scenarios.append(Scenario(
            f"hs-full-{tag}", f"stub: new TLS connection per request, full handshake, {cert} "
            f"(h2load --h1 -c {s.full_handshakes} -n {s.full_handshakes})",
            fronts, lambda f: load.h2load_handshakes(manifest(f), s.full_handshakes, False, acc),
            "conn/s", "nginx-ka"))
        scenarios.append(Scenario(
            f"hs-resumed-{tag}", f"stub: new TLS connection per request, resumed, {cert} "
            f"(h2load --h1 -c 32, Connection: close)",
            fronts, lambda f: load.h2load_handshakes(manifest(f), s.resumed_handshakes, True, acc),
            "conn/s", "nginx-ka"))

    reg = servers.registry_fronts
    scenarios.append(Scenario(
        "registry-get-c32", "registry upstream and all-in-one: manifest GET, HTTP/1.1 "
        "keep-alive, 32 connections (wrk)",
        with_apache(reg, servers.apache_registry) + servers.aio_fronts, wrk(manifest, 32),
        "req/s", "direct", warmup=wrk_warm(manifest, 32)))

    uploaders = reg + [servers.aio_fronts[0]]
    for chunked in (False, True):
        state = {}

        def run(f, chunked=chunked, state=state):
            digest = state["digest"] = upload_source.next_digest()
            auth = None if f.name == "direct" else basic("pusher5")
            return load.upload(
                f.url, "bench-upload", digest, upload_source.size, ca, auth,
                f"{servers.work}/upload.headers", whole=upload_source.whole,
                chunks=upload_source.chunks if chunked else None)

        def forget(f, state=state):
            # Keep the disk from filling up: drop the blob just pushed (never read back).
            hexd = state.pop("digest", "sha256:").split(":", 1)[1]
            if hexd:
                shutil.rmtree(f"{servers.registry_root}/docker/registry/v2/blobs/sha256/"
                              f"{hexd[:2]}/{hexd}", ignore_errors=True)

        how = "3 PATCH chunks + PUT" if chunked else "monolithic POST + PUT"
        scenarios.append(Scenario(
            f"upload-{'chunked' if chunked else 'mono'}",
            f"registry upstream and all-in-one: {upload_source.size >> 20} MiB blob upload, "
            f"{how}, digest verified (curl)",
            uploaders, run, "MB/s", "direct", after=forget))

    scenarios.append(Scenario(
        "aio-big", f"all-in-one: {content.big_size >> 20} MiB blob download, HTTP/1.1 (curl)",
        servers.aio_fronts, lambda f: load.download(big(f), content.big_size, ca), "MB/s",
        "registry-tls", sample_rss=True, warmup=small_download))
    return scenarios


def run_scenario(sc, sizes, say=print, profiler=None):
    runs = []
    if sc.warmup:
        for f in sc.fronts:
            try:
                sc.warmup(f)
            except load.LoadError:
                pass   # the measured runs will report it
    n = len(sc.fronts)
    for r in range(sizes.rounds):
        for f in sc.fronts[r % n:] + sc.fronts[:r % n]:
            perf = profiler.start(sc.key, f) if profiler else None
            try:
                with Probe(f.proc, sample_rss=sc.sample_rss) as probe:
                    try:
                        res = sc.run(f)
                        errors = res.errors
                    except load.LoadError as e:
                        res, errors = None, [str(e)]
            finally:
                if perf:
                    profiler.stop(perf)
            if sc.after:
                sc.after(f)
            rate = None
            if res is not None and not errors:
                rate = res.rate / 1e6 if sc.per_gib else res.rate
            run = Run(f.name, r, rate, res.count if res else 0, probe.cpu,
                      probe.peak_rss_kib, probe.rss_before_kib, probe.max_sampled_kib, errors)
            runs.append(run)
            shown = f"{rate:,.0f} {sc.unit}" if rate is not None else "FAILED"
            cpu = run.cpu_per_unit(sc.per_gib)
            cpu_s = "" if cpu is None else (f", CPU {cpu:.2f} s/GiB" if sc.per_gib
                                           else f", CPU {cpu:.0f} µs/{sc.unit.split('/')[0]}")
            say(f"  [{sc.key}] round {r + 1}/{sizes.rounds} {f.name}: {shown}{cpu_s}, "
                f"peak RSS {probe.peak_rss_kib / 1024:.1f} MiB")
            for e in errors:
                say(f"    error: {e}", file=sys.stderr)
    if profiler:
        for f in sc.fronts:
            top = profiler.report(sc.key, f.name)
            if top:
                say(f"  perf, {f.name}, last round (share of samples, dso, symbol):")
                say("\n".join("    " + line.strip() for line in top.splitlines()))
    return runs


class Results:
    """Medians and side-by-side ratios over the runs of every scenario."""

    def __init__(self, scenarios, runs_by_key):
        self.scenarios = {sc.key: sc for sc in scenarios}
        self.runs = runs_by_key

    def has(self, key, front):
        return any(r.front == front for r in self.runs.get(key, []))

    def _of(self, key, front):
        return [r for r in self.runs.get(key, []) if r.front == front]

    def median(self, key, front):
        vals = [r.rate for r in self._of(key, front) if r.rate is not None]
        return statistics.median(vals) if vals else None

    def spread(self, key, front):
        vals = [r.rate for r in self._of(key, front) if r.rate is not None]
        return (min(vals), max(vals)) if vals else (None, None)

    def ratio(self, key, front, anchor):
        by_round = {}
        for r in self.runs.get(key, []):
            if r.rate is not None:
                by_round.setdefault(r.round, {})[r.front] = r.rate
        ratios = [v[front] / v[anchor] for v in by_round.values()
                  if front in v and anchor in v and v[anchor] > 0]
        return statistics.median(ratios) if ratios else None

    def cpu(self, key, front):
        per_gib = self.scenarios[key].per_gib
        vals = [r.cpu_per_unit(per_gib) for r in self._of(key, front) if r.rate is not None]
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None

    def peak_rss_mib(self, key, front):
        vals = [r.peak_rss_kib for r in self._of(key, front)]
        return max(vals) / 1024 if vals else None

    def rss_growth_mib(self, key, front):
        """Largest (sampled RSS during the run − RSS just before it)."""
        vals = [r.max_rss_kib - r.idle_rss_kib for r in self._of(key, front)]
        return max(vals) / 1024 if vals else None

    def failures(self):
        return [(key, r) for key, runs in self.runs.items() for r in runs if r.errors]


def summary_rows(results, sc):
    """Per front: median, min, max, CPU per unit, peak RSS, ratio to the anchor."""
    rows = []
    for f in sc.fronts:
        lo, hi = results.spread(sc.key, f.name)
        rows.append((f.name, results.median(sc.key, f.name), lo, hi,
                     results.cpu(sc.key, f.name), results.peak_rss_mib(sc.key, f.name),
                     results.ratio(sc.key, f.name, sc.anchor)))
    return rows


def workdir_free_gib(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / GIB
