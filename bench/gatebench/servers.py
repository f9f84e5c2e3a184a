"""Start every server of the run on 127.0.0.1 and describe the fronts to measure.

    stub nginx (http)  ◄── gate, gate-rsa, nginx-recipe, nginx-ka (+rsa), apache
    docker-registry (http, "direct")  ◄── gate, nginx-recipe, nginx-ka, apache
    docker-registry with its own TLS  ─┐ same storage root
    gate all-in-one ([storage])       ─┘
"""

import base64
import os
from dataclasses import dataclass

from . import configs, load
from .procs import Proc, free_port, wait_http
from .setup import USERS


@dataclass
class Front:
    """Something a client talks to, and the process whose CPU and memory count."""
    name: str
    url: str
    proc: Proc


def basic(user):
    password = USERS[user][0]
    return "Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class Servers:
    def __init__(self, sup, work, gate_bin, certs, htpasswd, groups, content, with_apache):
        self.sup, self.work, self.gate_bin = sup, work, gate_bin
        self.certs, self.htpasswd, self.groups = certs, htpasswd, groups
        self.content = content
        self.with_apache = with_apache
        self.ca = certs["ca"]
        os.makedirs(f"{work}/logs", exist_ok=True)
        os.makedirs(f"{work}/conf", exist_ok=True)

    def _conf(self, name, text, mode=0o644):
        path = f"{self.work}/conf/{name}"
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def _proc(self, name, argv, port, env=None):
        return Proc(name, argv, f"{self.work}/logs/{name}.log", port, env=env)

    def _gate(self, name, cert, **backend):
        """A gate; `backend`: configs.gate's upstream_port, storage_root or backend."""
        port = free_port()
        chain, key = self.certs[cert]
        conf = self._conf(f"{name}.toml", configs.gate(
            port, chain, key, self.htpasswd, self.groups, **backend))
        proc = self.sup.start(self._proc(name, [self.gate_bin, "serve", "--config", conf], port))
        wait_http(f"https://127.0.0.1:{port}/v2/", proc, cafile=self.ca, ok=(200, 401))
        return proc

    def _nginx(self, name, text, port):
        conf = self._conf(f"nginx-{name}.conf", text)
        return self.sup.start(self._proc(f"nginx-{name}", ["nginx", "-p", self.work, "-c", conf],
                                         port))

    def _registry(self, name, port, root=None, tls=False, driver=None):
        """docker-registry on `root`, or with the storage `driver` section (its config is
        then private: it may hold a secret key)."""
        cert, key = self.certs["ec"] if tls else (None, None)
        conf = self._conf(f"{name}.yml", configs.registry(port, root, cert, key, driver),
                          mode=0o600 if driver else 0o644)
        # Its s3-aws driver panics at start when AWS_CA_BUNDLE is set (2.8.2; the tests
        # remove it too).
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
        proc = self.sup.start(self._proc(name, ["docker-registry", "serve", conf], port,
                                         env=env))
        scheme = "https" if tls else "http"
        wait_http(f"{scheme}://127.0.0.1:{port}/v2/", proc, cafile=self.ca)
        return proc

    def start(self):
        w, ec, rsa = self.work, self.certs["ec"], self.certs["rsa"]
        self.registry_root = f"{w}/registry"
        os.makedirs(self.registry_root, exist_ok=True)

        # Upstreams.
        stub_port = free_port()
        self.stub = self._nginx("stub", configs.nginx_stub(
            w, stub_port, self.content.dir, self.content.manifest_digest), stub_port)
        reg_port = free_port()
        self.registry = self._registry("registry", reg_port, self.registry_root, tls=False)
        self.fill_registry(f"http://127.0.0.1:{reg_port}")
        reg_tls_port = free_port()
        self.registry_tls = self._registry("registry-tls", reg_tls_port, self.registry_root, tls=True)

        # The gates.
        self.gate_stub = self._gate("gate-stub", "ec", upstream_port=stub_port)
        self.gate_stub_rsa = self._gate("gate-stub-rsa", "rsa", upstream_port=stub_port)
        self.gate_reg = self._gate("gate-registry", "ec", upstream_port=reg_port)
        self.gate_aio = self._gate("gate-aio", "ec", storage_root=self.registry_root)

        # nginx: the recipe and the tuned one, each in front of both upstreams.
        recipe_ports = [free_port(), free_port()]
        self.recipe = self._nginx("recipe", configs.nginx_recipe(w, [
            (recipe_ports[0], stub_port, *ec), (recipe_ports[1], reg_port, *ec)],
            self.htpasswd), recipe_ports[0])
        ka_ports = [free_port(), free_port(), free_port()]
        self.ka = self._nginx("ka", configs.nginx_ka(w, [
            (ka_ports[0], stub_port, *ec), (ka_ports[1], reg_port, *ec),
            (ka_ports[2], stub_port, *rsa)], self.htpasswd), ka_ports[0])

        url = lambda port: f"https://127.0.0.1:{port}"
        self.stub_fronts = [
            Front("gate", url(self.gate_stub.port), self.gate_stub),
            Front("nginx-recipe", url(recipe_ports[0]), self.recipe),
            Front("nginx-ka", url(ka_ports[0]), self.ka),
        ]
        self.stub_rsa_fronts = [
            Front("gate", url(self.gate_stub_rsa.port), self.gate_stub_rsa),
            Front("nginx-ka", url(ka_ports[2]), self.ka),
        ]
        self.registry_fronts = [
            Front("gate", url(self.gate_reg.port), self.gate_reg),
            Front("nginx-recipe", url(recipe_ports[1]), self.recipe),
            Front("nginx-ka", url(ka_ports[1]), self.ka),
            Front("direct", f"http://127.0.0.1:{reg_port}", self.registry),
        ]
        self.aio_fronts = [
            Front("gate-aio", url(self.gate_aio.port), self.gate_aio),
            Front("registry-tls", url(reg_tls_port), self.registry_tls),
        ]
        self.apache_stub = self.apache_registry = None
        if self.with_apache:
            ports = [free_port(), free_port()]
            conf = self._conf("apache.conf", configs.apache(w, [
                (ports[0], stub_port, *ec), (ports[1], reg_port, *ec)],
                self.htpasswd, self.groups))
            proc = self.sup.start(self._proc(
                "apache", ["apache2", "-f", conf, "-DFOREGROUND"], ports[0]))
            self.apache_stub = Front("apache", url(ports[0]), proc)
            self.apache_registry = Front("apache", url(ports[1]), proc)
        accept = dict([configs.MANIFEST_ACCEPT.split(": ", 1)])
        for front in self.all_fronts():
            wait_http(f"{front.url}/v2/bench/manifests/latest", front.proc, cafile=self.ca,
                      headers=accept)

    def all_fronts(self):
        fronts = (self.stub_fronts + self.stub_rsa_fronts + self.registry_fronts
                  + self.aio_fronts)
        return fronts + [f for f in (self.apache_stub, self.apache_registry) if f]

    def fill_registry(self, base):
        """Push the test image into the registry (the all-in-one gate shares its storage)."""
        c, hdr = self.content, f"{self.work}/push.headers"
        for digest in c.blobs():
            size = os.path.getsize(c.path(digest))
            load.upload(base, "bench", digest, size, None, None, hdr, whole=c.path(digest))
        load.put_manifest(base, "bench", "latest", f"{c.dir}/manifest.json",
                          configs.MANIFEST_TYPE, self.ca, None, hdr)
