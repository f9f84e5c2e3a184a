"""The front cache (issue 13): the gate with `[cache]` against the gate without it,
nginx-ka, nginx with its own `proxy_cache` ("nginx-cache"), the registry direct and,
for the big download, the all-in-one gate. Every front is in front of the same
docker-registry.

Warm runs repeat what was fetched before (a warm-up fills the caches); cold runs
fetch content no front has seen: each round pushes fresh manifests and blobs to the
registry first, and every front fetches each of them once.

nginx-cache is nginx-ka with, for the paths that name a digest (`/manifests/sha256:…`
and `/blobs/sha256:…`), `proxy_cache` on a disk zone (`levels=1:2`,
`use_temp_path=off`, 1 year validity, `proxy_cache_lock` so concurrent misses fetch
once, `proxy_cache_convert_head` on so a HEAD is answered from a cached GET),
`proxy_buffering on` (nginx caches only buffered responses), `sendfile`, `aio
threads` and `open_file_cache` for the cached files. Its cache is keyed by URI, so it
is per repository already, but it serves a cached digest without asking the registry
again (no confirmation, and a manifest deleted upstream stays served): weaker than the
gate's, which is the point of comparing the cost.
"""

import json
import os
import hashlib
import time

from . import configs, load
from .configs import MANIFEST_ACCEPT, MANIFEST_TYPE
from .procs import free_port, wait_http
from .scenarios import Scenario
from .servers import Front
from .setup import SetupError, write_blob

CACHE_MAX = "4GiB"


def nginx_cache(work, port, upstream_port, cert, key, htpasswd, cache_dir):
    """nginx-ka plus proxy_cache for what a digest names."""
    os.makedirs(cache_dir, exist_ok=True)
    location = configs._recipe_location("docker-registry-c", htpasswd, tuned=True)
    cached = location.replace(
        "    location /v2/ {",
        "    location ~ \"^/v2/.+/(manifests|blobs)/sha256:[a-f0-9]{64}$\" {", 1).replace(
        "      proxy_buffering off;", """\
      proxy_buffering on;
      proxy_cache regcache;
      proxy_cache_key $uri;
      proxy_cache_valid 200 1y;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 600s;
      proxy_cache_lock_age 600s;
      proxy_cache_methods GET HEAD;
      proxy_cache_convert_head on;
      proxy_ignore_headers Cache-Control Expires Set-Cookie;
      proxy_max_temp_file_size 0;""", 1)
    body = f"""{configs._RECIPE_HTTP}
  keepalive_requests 100000000;
  sendfile on;
  aio threads;
  open_file_cache max=10000 inactive=60s;
  proxy_cache_path {cache_dir} levels=1:2 keys_zone=regcache:50m max_size={CACHE_MAX[:-3]}g
                   inactive=1d use_temp_path=off;
""" + configs.ka_upstream_server("docker-registry-c", port, upstream_port, cert, key,
                                 cached + "\n" + location)
    return configs._nginx_main(work, "cache", "auto", body)


def gate_cache_section(cache_dir):
    return f"""
[cache]
dir = "{cache_dir}"
max_size = "{CACHE_MAX}"
memory_entries = 1000
"""


class CacheServers:
    """gate-cache and nginx-cache, in front of the run's docker-registry."""

    def __init__(self, servers):
        self.s = servers

    def start(self):
        s = self.s
        reg_port = s.registry.port
        port = free_port()
        chain, key = s.certs["ec"]
        conf = s._conf("gate-cache.toml", configs.gate(
            port, chain, key, s.htpasswd, s.groups, upstream_port=reg_port)
            + gate_cache_section(f"{s.work}/gate-cache"))
        self.gate = s.sup.start(s._proc("gate-cache", [s.gate_bin, "serve", "--config", conf],
                                        port))
        wait_http(f"https://127.0.0.1:{port}/v2/", self.gate, cafile=s.ca, ok=(200, 401))
        nport = free_port()
        self.nginx = s._nginx("cache", nginx_cache(s.work, nport, reg_port, chain, key,
                                                    s.htpasswd, f"{s.work}/nginx-cache"), nport)
        url = lambda p: f"https://127.0.0.1:{p}"
        reg = {f.name: f for f in s.registry_fronts}
        self.gate_front = Front("gate-cache", url(port), self.gate)
        self.nginx_front = Front("nginx-cache", url(nport), self.nginx)
        accept = dict([MANIFEST_ACCEPT.split(": ", 1)])
        for f in (self.gate_front, self.nginx_front):
            wait_http(f"{f.url}/v2/bench/manifests/latest", f.proc, cafile=s.ca, headers=accept)
        # Without cache, with cache, and the anchors.
        self.fronts = [reg["gate"], self.gate_front, reg["nginx-ka"], self.nginx_front,
                       reg["direct"]]


class ColdContent:
    """Content pushed to the registry before each cold round, never fetched before."""

    def __init__(self, servers, content):
        self.s, self.content = servers, content
        self.base = servers.registry_fronts[3].url   # the registry, plain HTTP
        self.dir = f"{servers.work}/cold"
        os.makedirs(self.dir, exist_ok=True)
        self.n = 0

    def _seed(self, what):
        self.n += 1
        return f"cold-{what}-{os.getpid()}-{self.n}-{time.time_ns()}"

    def fresh_manifests(self, count):
        """`count` new manifests (tag, digest), pushed by tag in one curl run."""
        c = self.content
        cfg_size = os.path.getsize(c.path(c.config))
        ops, out = [], []
        seed = self._seed("manifests")
        for i in range(count):
            body = json.dumps({
                "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": c.config, "size": cfg_size},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                            "digest": c.small, "size": c.small_size}],
                "annotations": {"n": f"{seed}-{i}"},
            }).encode()
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            path = f"{self.dir}/{digest[7:]}.json"
            with open(path, "wb") as f:
                f.write(body)
            tag = f"c{hashlib.sha256(f'{seed}-{i}'.encode()).hexdigest()[:16]}"
            ops.append(load.Op(f"{self.base}/v2/bench/manifests/{tag}", method="PUT",
                               data=path, headers=[f"Content-Type: {MANIFEST_TYPE}"]))
            out.append((tag, digest))
        _must(load.curl_many(ops, 8, None, want=("201",)), "push cold manifests")
        return out

    def fresh_blobs(self, count, size):
        """`count` new blobs of `size` bytes (POST, then PUT with the blob)."""
        out = []
        headers = f"{self.dir}/push.headers"
        for _ in range(count):
            path = f"{self.dir}/blob.tmp"
            digest = write_blob(path, size, self._seed("blob"))
            load.upload(self.base, "bench", digest, size, None, None, headers, whole=path)
            os.remove(path)
            out.append(digest)
        return out


def _must(res, what):
    if res.errors:
        raise load.LoadError(f"{what}: {'; '.join(res.errors[:3])}")


def build(servers, cache, content, sizes, ca):
    """The cache scenarios: warm and cold for each workload."""
    s = sizes
    fronts = cache.fronts
    no_direct = fronts[:4]
    quick = s.big < (1 << 30)
    n_manifests = 300 if quick else 2000
    n_pairs = 200 if quick else 1000
    acc = [MANIFEST_ACCEPT]
    cold = ColdContent(servers, content)
    by_digest = lambda f: f"{f.url}/v2/bench/manifests/{content.manifest_digest}"
    small = lambda f: f"{f.url}/v2/bench/blobs/{content.small}"
    big = lambda f: f"{f.url}/v2/bench/blobs/{content.big}"
    pairs = [load.Op("/v2/bench/manifests/latest", method="HEAD", headers=acc),
             load.Op(f"/v2/bench/manifests/{content.manifest_digest}", headers=acc)]

    def pull_ops(f, items):
        ops = []
        for tag, digest in items:
            ops.append(load.Op(f"{f.url}/v2/bench/manifests/{tag}", method="HEAD", headers=acc))
            ops.append(load.Op(f"{f.url}/v2/bench/manifests/{digest}", headers=acc))
        return ops

    def with_url(f, ops):
        return [load.Op(f.url + o.url, o.method, o.data, o.headers) for o in ops]

    # Fresh content for every round, pushed to the registry by the scenario's warm-up
    # (before its first round, outside any measurement).
    def fresh(make):
        made = {}

        def prepare(_front):
            # A failed warm-up is passed over by the scenario loop: this one stops the run.
            try:
                while len(made) < s.rounds:
                    made[len(made)] = make()
            except load.LoadError as e:
                raise SetupError(f"pushing fresh content for the cold runs: {e}")
        return made, prepare

    cold_manifests, prep_manifests = fresh(lambda: cold.fresh_manifests(n_manifests))
    cold_pulls, prep_pulls = fresh(lambda: cold.fresh_manifests(n_pairs // 2))
    cold_small, prep_small = fresh(lambda: cold.fresh_blobs(50, content.small_size))
    cold_big, prep_big = fresh(lambda: cold.fresh_blobs(1, content.big_size)[0])
    runs_of = {}

    def round_of(f, key):
        # Each front runs once per round, in an order that rotates: its own count.
        n = runs_of.setdefault(key, {})
        n[f.name] = n.get(f.name, -1) + 1
        return n[f.name]

    def warm_pull(f):
        return load.curl_many(with_url(f, pairs) * (n_pairs // 2), 32, ca,
                              want=("200",), unit_pairs=True)

    def cold_pull(f):
        items = cold_pulls[round_of(f, "pull")]
        return load.curl_many(pull_ops(f, items), 32, ca, want=("200",), unit_pairs=True)

    def cold_digest(f):
        items = cold_manifests[round_of(f, "digest")]
        ops = [load.Op(f"{f.url}/v2/bench/manifests/{d}", headers=acc) for _, d in items]
        return load.curl_many(ops, 32, ca, want=("200",))

    def cold_50(f):
        digests = cold_small[round_of(f, "small")]
        ops = [load.Op(f"{f.url}/v2/bench/blobs/{d}") for d in digests]
        return load.curl_many(ops, 50, ca, want=("200",), bytes_each=content.small_size)

    def cold_1g(f):
        d = cold_big[round_of(f, "big")]
        return load.download(f"{f.url}/v2/bench/blobs/{d}", content.big_size, ca)

    def warm_wrk(url, c, size=None):
        def run(f):
            r = load.wrk(url(f), c, s.seconds, acc if size is None else ())
            if size:
                r.count *= size
            return r
        return run

    def fill(url, c=4):
        def run(f):
            load.wrk(url(f), c, 1, acc)
        return run

    big_fronts = no_direct + [servers.aio_fronts[0]]
    return [
        Scenario("cache-digest-warm", "cache: manifest GET by digest, warm, HTTP/1.1 "
                 "keep-alive, 32 connections (wrk)", fronts, warm_wrk(by_digest, 32),
                 "req/s", "nginx-cache", warmup=fill(by_digest)),
        Scenario("cache-digest-cold", f"cache: {n_manifests} manifests never fetched before, "
                 f"each GET by digest once, 32 in parallel (curl --parallel)", fronts,
                 cold_digest, "req/s", "gate", warmup=prep_manifests),
        Scenario("cache-pull-warm", f"cache: docker pull's manifest requests, HEAD by tag then "
                 f"GET by digest, {n_pairs // 2} pairs, 32 in parallel (curl --parallel), warm",
                 fronts, warm_pull, "pairs/s", "nginx-cache", warmup=warm_pull),
        Scenario("cache-pull-cold", f"cache: the same for {n_pairs // 2} tags never fetched "
                 f"before", fronts, cold_pull, "pairs/s", "gate", warmup=prep_pulls),
        Scenario("cache-big-warm", f"cache: {content.big_size >> 20} MiB blob download, "
                 f"HTTP/1.1 (curl), warm", big_fronts,
                 lambda f: load.download(big(f), content.big_size, ca), "MB/s", "gate-aio",
                 sample_rss=True,
                 warmup=lambda f: load.download(big(f), content.big_size, ca)),
        Scenario("cache-big-cold", f"cache: {content.big_size >> 20} MiB blob never fetched "
                 f"before, HTTP/1.1 (curl)", no_direct, cold_1g, "MB/s", "gate",
                 sample_rss=True, warmup=prep_big),
        Scenario("cache-50x1m-warm", "cache: 50 concurrent 1 MiB blob downloads, keep-alive "
                 "(wrk -c 50), warm", no_direct, warm_wrk(small, 50, content.small_size),
                 "MB/s", "nginx-cache", warmup=fill(small)),
        Scenario("cache-50x1m-cold", "cache: 50 1 MiB blobs never fetched before, all at "
                 "once (curl --parallel 50)", no_direct, cold_50, "MB/s", "gate", warmup=prep_small),
    ]


def targets(t, results, big_mib):
    """The targets of issue 13 (printed, not asserted), on a report.Targets."""
    r = results
    t.ratio_at_least("warm manifest GET by digest: gate-cache / direct", "cache-digest-warm",
                     "gate-cache", "direct", 10)
    t.ratio_at_least("warm manifest GET by digest: gate-cache / nginx-cache",
                     "cache-digest-warm", "gate-cache", "nginx-cache", 1.3)
    t.ratio_at_least(f"warm {big_mib} MiB download: gate-cache / gate-aio", "cache-big-warm",
                     "gate-cache", "gate-aio", 1.0)
    t.ratio_at_least("warm 50 x 1 MiB: gate-cache / nginx-cache", "cache-50x1m-warm",
                     "gate-cache", "nginx-cache", 1.5)
    for key, what in (("cache-digest-cold", "manifest GET by digest"),
                      ("cache-pull-cold", "HEAD by tag + GET by digest"),
                      ("cache-big-cold", f"{big_mib} MiB download"),
                      ("cache-50x1m-cold", "50 x 1 MiB")):
        t.ratio_at_least(f"cold {what}: gate-cache / gate (no cache)", key, "gate-cache",
                         "gate", 0.95)
    # The 1 GiB runs show memory flat under one big download; the 50 x 1 MiB runs show
    # what 50 concurrent downloads cost (at most 256 KiB read ahead each).
    for key in ("cache-big-warm", "cache-big-cold", "cache-50x1m-warm", "cache-50x1m-cold"):
        t.mib_at_most(f"memory: gate-cache peak RSS, {key}", key,
                      r.peak_rss_mib(key, "gate-cache") if r.has(key, "gate-cache") else None,
                      40)
