"""What the run needs before any server starts: tools, certificates, users, content."""

import hashlib
import json
import os
import shutil
import subprocess

# Tool -> the Debian package that has it.
REQUIRED_TOOLS = {
    "nginx": "nginx",
    "wrk": "wrk",
    "h2load": "nghttp2-client",
    "ab": "apache2-utils",
    "docker-registry": "docker-registry",
    "openssl": "openssl",
    "curl": "curl",
    "cargo": "cargo (rustup)",
}
OPTIONAL_TOOLS = {"apache2": "apache2"}

INSTALL_HINT = ("apt-get install -y nginx wrk nghttp2-client apache2-utils "
                "docker-registry openssl curl  (optional: apache2)")


class SetupError(Exception):
    pass


def check_tools():
    """Fail with the package names of missing tools; return the optional ones found."""
    missing = [f"{tool} (package {pkg})" for tool, pkg in REQUIRED_TOOLS.items()
               if shutil.which(tool) is None]
    if missing:
        raise SetupError("missing: " + ", ".join(missing) + "\ninstall: " + INSTALL_HINT)
    return {tool for tool in OPTIONAL_TOOLS if shutil.which(tool)}


def run(argv, **kw):
    done = subprocess.run(argv, capture_output=True, text=True, **kw)
    if done.returncode != 0:
        raise SetupError(f"{' '.join(argv)} failed ({done.returncode}):\n"
                         f"{done.stdout}{done.stderr}")
    return done.stdout


def make_certs(dir):
    """A throw-away CA and two server certificates for 127.0.0.1 (ECDSA P-256, RSA-2048).

    Returns {"ca": path, "ec": (chain, key), "rsa": (chain, key)}.
    """
    os.makedirs(dir, exist_ok=True)
    ca_key, ca_crt = f"{dir}/ca.key", f"{dir}/ca.crt"
    run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-out", ca_key])
    run(["openssl", "req", "-x509", "-new", "-key", ca_key, "-sha256", "-days", "2",
         "-subj", "/CN=registry-gate bench throw-away CA",
         "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", ca_crt])
    ext = f"{dir}/leaf.ext"
    with open(ext, "w") as f:
        f.write("basicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\n"
                "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    out = {"ca": ca_crt}
    for kind, keyopts in (("ec", ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]),
                          ("rsa", ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])):
        key, csr, leaf, chain = (f"{dir}/{kind}.key", f"{dir}/{kind}.csr",
                                 f"{dir}/{kind}.crt", f"{dir}/{kind}-fullchain.pem")
        run(["openssl", "genpkey", *keyopts, "-out", key])
        run(["openssl", "req", "-new", "-key", key, "-subj", "/CN=localhost", "-out", csr])
        run(["openssl", "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key,
             "-CAcreateserial", "-days", "2", "-sha256", "-extfile", ext, "-out", leaf])
        with open(chain, "w") as f:
            for part in (leaf, ca_crt):
                with open(part) as src:
                    f.write(src.read())
        out[kind] = (chain, key)
    return out


# Users: name -> (password, bcrypt cost). Both may push.
USERS = {"pusher5": ("bench-pass-5", 5), "pusher10": ("bench-pass-10", 10)}


def make_users(gate_bin, dir):
    """htpasswd + group file written by `registry-gate user add` (bcrypt)."""
    os.makedirs(dir, exist_ok=True)
    htpasswd, groups = f"{dir}/httpd.htpasswd", f"{dir}/httpd.groups"
    for name, (password, cost) in USERS.items():
        run([gate_bin, "user", "add", name, "--group", "pusher", "--cost", str(cost),
             "--htpasswd", htpasswd, "--groups", groups], input=password + "\n")
    # Apache and nginx run their workers as another user; they read these files.
    for f in (htpasswd, groups):
        os.chmod(f, 0o644)
    return htpasswd, groups


def write_blob(path, size, seed):
    """`size` bytes of pseudo-random content (a random 4 MiB block, each copy numbered)."""
    block = hashlib.shake_256(seed.encode()).digest(4 << 20)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left, n = size, 0
        while left > 0:
            piece = (n.to_bytes(8, "big") + block[8:])[:left]
            f.write(piece)
            h.update(piece)
            left -= len(piece)
            n += 1
    return "sha256:" + h.hexdigest()


class Content:
    """The test image: a config, a 1 MiB layer and a big layer, plus an OCI manifest.

    Files live in `dir/blobs/<hex>`, the manifest in `dir/manifest.json`; the stub
    upstream serves them as they are.
    """

    def __init__(self, dir, big_size):
        self.dir = dir
        os.makedirs(f"{dir}/blobs", exist_ok=True)
        self.small_size = 1 << 20
        self.big_size = big_size
        self.small = self._blob("small", self.small_size)
        self.big = self._blob("big", big_size)
        config = json.dumps({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [self.small, self.big]},
        }).encode()
        self.config = "sha256:" + hashlib.sha256(config).hexdigest()
        with open(self.path(self.config), "wb") as f:
            f.write(config)
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": self.config, "size": len(config)},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar",
                 "digest": self.small, "size": self.small_size},
                {"mediaType": "application/vnd.oci.image.layer.v1.tar",
                 "digest": self.big, "size": big_size},
            ],
        }
        self.manifest = json.dumps(manifest, indent=3).encode()
        self.manifest_digest = "sha256:" + hashlib.sha256(self.manifest).hexdigest()
        with open(f"{dir}/manifest.json", "wb") as f:
            f.write(self.manifest)

    def _blob(self, name, size):
        tmp = f"{self.dir}/{name}.tmp"
        digest = write_blob(tmp, size, name)
        os.replace(tmp, self.path(digest))
        return digest

    def path(self, digest):
        return f"{self.dir}/blobs/{digest.split(':', 1)[1]}"

    def blobs(self):
        return [self.config, self.small, self.big]


class UploadSource:
    """A blob to upload, whole and in three chunks, made unique before each upload.

    Re-uploading the same digest could let a registry skip work, so the last 32 bytes
    change every time; the digest of everything before them is computed once.
    """

    TAIL = 32

    def __init__(self, dir, size):
        os.makedirs(dir, exist_ok=True)
        self.size = size
        self.whole = f"{dir}/whole.bin"
        write_blob(self.whole, size, "upload")
        third = size // 3
        bounds = [(0, third), (third, 2 * third), (2 * third, size)]
        self.chunks = []
        with open(self.whole, "rb") as src:
            for i, (start, end) in enumerate(bounds):
                path = f"{dir}/chunk{i}.bin"
                src.seek(start)
                with open(path, "wb") as dst:
                    left = end - start
                    while left:
                        piece = src.read(min(left, 8 << 20))
                        dst.write(piece)
                        left -= len(piece)
                self.chunks.append((path, start, end))
        self._prefix = hashlib.sha256()
        with open(self.whole, "rb") as src:
            left = size - self.TAIL
            while left:
                piece = src.read(min(left, 8 << 20))
                self._prefix.update(piece)
                left -= len(piece)
        self.count = 0

    def next_digest(self):
        """Give the blob a new tail (in the whole file and the last chunk); its digest."""
        self.count += 1
        tail = hashlib.sha256(f"{os.getpid()}-{self.count}".encode()).digest()[: self.TAIL]
        for path in (self.whole, self.chunks[-1][0]):
            with open(path, "r+b") as f:
                f.seek(-self.TAIL, os.SEEK_END)
                f.write(tail)
        h = self._prefix.copy()
        h.update(tail)
        return "sha256:" + h.hexdigest()
