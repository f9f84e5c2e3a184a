"""Configuration files for everything the benchmark starts. Text in, text out.

The fronts being compared:

* nginx-recipe: the Docker docs' nginx recipe ("Authenticate proxy with nginx"):
  no upstream keep-alive, proxy buffering on (the default), client_max_body_size 0,
  chunked_transfer_encoding on, TLS 1.1/1.2 with the recipe's ciphers and a shared
  session cache, the user-agent check and the Docker-Distribution-Api-Version map.
  One change, so that it admits what the gate admits: reads are anonymous unless the
  client sends credentials (then they are checked, as the gate does), writes need
  the password file — the recipe's own `auth_basic` would refuse anonymous pulls.
* nginx-ka: the same plus what a tuned set-up adds: upstream keep-alive pool,
  proxy_buffering off, proxy_request_buffering off, HTTP/2, TLS 1.3, tickets, and
  proxy_buffer_size 64k (unbuffered, nginx reads the upstream in pieces of that size;
  the 4 KiB default costs it 3-4x the CPU per GiB).
* apache: the Docker docs' Apache recipe (with `<Limit GET HEAD> Require all granted`
  for anonymous pulls, as the README's migration table has it). Optional.
* stub: nginx serving the manifest and blobs from files, with the registry's
  headers: a fast upstream, so that the front is the bottleneck.
"""

import os
import resource

IS_ROOT = os.geteuid() == 0

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
# What docker sends when it pulls; the CNCF registry serves an OCI manifest only to a
# client that accepts it.
MANIFEST_ACCEPT = ("Accept: application/vnd.oci.image.manifest.v1+json, "
                   "application/vnd.docker.distribution.manifest.v2+json, "
                   "application/vnd.oci.image.index.v1+json, "
                   "application/vnd.docker.distribution.manifest.list.v2+json")


def _nginx_main(work, name, workers, body):
    """The parts of an nginx.conf every instance shares: foreground, own temp dirs."""
    tmp = f"{work}/nginx-{name}"
    os.makedirs(tmp, exist_ok=True)
    user = "user root;" if IS_ROOT else ""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = 65536 if nofile == resource.RLIM_INFINITY else min(nofile, 65536)
    return f"""\
# {name}: written by bench/run, thrown away after the run.
{user}
worker_processes {workers};
worker_rlimit_nofile {nofile};
daemon off;
pid {tmp}/nginx.pid;
error_log {work}/logs/nginx-{name}.log warn;
events {{ worker_connections {nofile // 2}; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/client_body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
{body}
}}
"""


def nginx_stub(work, port, content, manifest_digest):
    """The fast static upstream: /v2/, the manifest by tag and digest, blobs by digest."""
    body = f"""\
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    add_header Docker-Distribution-Api-Version registry/2.0 always;
    location = /v2/ {{
      default_type application/json;
      return 200 '{{}}';
    }}
    location ~ ^/v2/bench/manifests/(latest|{manifest_digest})$ {{
      alias {content}/manifest.json;
      types {{ }}
      default_type {MANIFEST_TYPE};
      add_header Docker-Content-Digest {manifest_digest};
      add_header Docker-Distribution-Api-Version registry/2.0;
    }}
    location ~ "^/v2/bench/blobs/sha256:([0-9a-f]{{64}})$" {{
      alias {content}/blobs/$1;
      types {{ }}
      default_type application/octet-stream;
      add_header Docker-Content-Digest sha256:$1;
      add_header Docker-Distribution-Api-Version registry/2.0;
    }}
  }}"""
    return _nginx_main(work, "stub", 1, body)


# The recipe's own lines, shared by both nginx fronts.
_RECIPE_HTTP = """\
  map $upstream_http_docker_distribution_api_version $docker_distribution_api_version {
    '' 'registry/2.0';
  }
  # Not in the recipe: credentials are checked when sent; reads need none (see above).
  map $http_authorization $bench_read_realm {
    '' off;
    default "Registry realm";
  }"""


def _recipe_location(upstream, htpasswd, tuned):
    tuning = """
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_buffer_size 64k;
      proxy_buffers 4 64k;
      proxy_busy_buffers_size 128k;""" if tuned else ""
    return f"""\
    location /v2/ {{
      if ($http_user_agent ~ "^(docker\\/1\\.(3|4|5(?!\\.[0-9]-dev))|Go ).*$" ) {{
        return 404;
      }}
      auth_basic $bench_read_realm;
      auth_basic_user_file {htpasswd};
      limit_except GET HEAD {{
        auth_basic "Registry realm";
        auth_basic_user_file {htpasswd};
      }}
      add_header 'Docker-Distribution-Api-Version' $docker_distribution_api_version always;

      proxy_pass                          http://{upstream};
      proxy_set_header  Host              $http_host;
      proxy_set_header  X-Real-IP         $remote_addr;
      proxy_set_header  X-Forwarded-For   $proxy_add_x_forwarded_for;
      proxy_set_header  X-Forwarded-Proto $scheme;
      proxy_read_timeout                  900;{tuning}
    }}"""


def nginx_recipe(work, servers, htpasswd):
    """`servers`: list of (listen port, upstream port, cert, key)."""
    blocks = [_RECIPE_HTTP]
    for i, (port, upstream_port, cert, key) in enumerate(servers):
        blocks.append(f"""\
  upstream docker-registry-{i} {{
    server 127.0.0.1:{upstream_port};
  }}
  server {{
    listen 127.0.0.1:{port} ssl backlog=4096;
    server_name localhost;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.1 TLSv1.2;
    ssl_ciphers 'EECDH+AESGCM:EDH+AESGCM:AES256+EECDH:AES256+EDH';
    ssl_prefer_server_ciphers on;
    ssl_session_cache shared:SSL:10m;
    client_max_body_size 0;
    chunked_transfer_encoding on;
{_recipe_location(f"docker-registry-{i}", htpasswd, tuned=False)}
  }}""")
    return _nginx_main(work, "recipe", "auto", "\n".join(blocks))


def ka_upstream_server(name, port, upstream_port, cert, key, locations):
    """One nginx-ka `upstream` (keep-alive pool) and its TLS `server` with `locations`."""
    return f"""\
  upstream {name} {{
    server 127.0.0.1:{upstream_port};
    keepalive 128;
    keepalive_requests 100000000;
  }}
  server {{
    listen 127.0.0.1:{port} ssl http2 backlog=4096;
    server_name localhost;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:SSL:10m;
    ssl_session_tickets on;
    client_max_body_size 0;
    chunked_transfer_encoding on;
{locations}
  }}"""


def nginx_ka(work, servers, htpasswd):
    """The recipe tuned: keep-alive pool upstream, streaming both ways, HTTP/2, TLS 1.3."""
    blocks = [_RECIPE_HTTP, "  keepalive_requests 100000000;"]
    for i, (port, upstream_port, cert, key) in enumerate(servers):
        name = f"docker-registry-{i}"
        blocks.append(ka_upstream_server(name, port, upstream_port, cert, key,
                                         _recipe_location(name, htpasswd, tuned=True)))
    return _nginx_main(work, "ka", "auto", "\n".join(blocks))


APACHE_MODULES = [
    "mpm_event", "authn_core", "authn_file", "authz_core", "authz_groupfile",
    "authz_user", "auth_basic", "access_compat", "headers", "log_config", "socache_shmcb",
    "ssl", "proxy", "proxy_http", "unixd",
]


def apache(work, servers, htpasswd, groups, modules_dir="/usr/lib/apache2/modules"):
    """The Docker docs' Apache recipe; `servers`: list of (port, upstream port, cert, key)."""
    root = f"{work}/apache"
    os.makedirs(root, exist_ok=True)
    # Some of these are built into Debian's apache2 (log_config, unixd, ...): load the rest.
    loads = "\n".join(f"LoadModule {m}_module {modules_dir}/mod_{m}.so" for m in APACHE_MODULES
                      if os.path.exists(f"{modules_dir}/mod_{m}.so"))
    user = "User www-data\nGroup www-data" if IS_ROOT else ""
    listens = "\n".join(f"Listen 127.0.0.1:{p}" for p, *_ in servers)
    vhosts = []
    for port, upstream_port, cert, key in servers:
        vhosts.append(f"""\
<VirtualHost 127.0.0.1:{port}>
  ServerName localhost
  SSLEngine on
  SSLCertificateFile {cert}
  SSLCertificateKeyFile {key}
  SSLCompression off
  SSLProtocol all -SSLv2 -SSLv3 -TLSv1
  SSLCipherSuite EECDH+AESGCM:EDH+AESGCM:AES256+EECDH:AES256+EDH
  SSLHonorCipherOrder on

  Header always set "Docker-Distribution-Api-Version" "registry/2.0"
  Header onsuccess set "Docker-Distribution-Api-Version" "registry/2.0"
  RequestHeader set X-Forwarded-Proto "https"

  ProxyRequests     off
  ProxyPreserveHost on
  ProxyPass /v1/_ping !
  ProxyPass        /v2 http://127.0.0.1:{upstream_port}/v2
  ProxyPassReverse /v2 http://127.0.0.1:{upstream_port}/v2

  <Location /v2>
    Order deny,allow
    Allow from all
    AuthName "Registry Authentication"
    AuthType basic
    AuthUserFile "{htpasswd}"
    AuthGroupFile "{groups}"
    <Limit GET HEAD>
      Require all granted
    </Limit>
    <Limit POST PUT DELETE PATCH>
      Require group pusher
    </Limit>
  </Location>
</VirtualHost>""")
    return f"""\
# apache: written by bench/run, thrown away after the run.
ServerRoot {root}
PidFile {root}/httpd.pid
DefaultRuntimeDir {root}
Mutex file:{root} default
{loads}
{user}
ServerName localhost
ErrorLog {work}/logs/apache-error.log
LogLevel warn
SSLRandomSeed startup builtin
SSLRandomSeed connect builtin
SSLSessionCache shmcb:{root}/ssl_scache(512000)
<Directory />
  AllowOverride none
  Require all denied
</Directory>
{listens}
{chr(10).join(vhosts)}
"""


def registry(port, root=None, cert=None, key=None, driver=None):
    """The CNCF registry (Debian docker-registry), like registry:2's default config: on
    the filesystem at `root`, or with `driver`, the storage lines that replace it."""
    tls = f"""
  tls:
    certificate: {cert}
    key: {key}""" if cert else ""
    driver = driver or f"""\
  filesystem:
    rootdirectory: {root}
"""
    return f"""\
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
{driver.rstrip()}
  cache:
    blobdescriptor: inmemory
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: registry-gate-bench-not-secret
  headers:
    X-Content-Type-Options: [nosniff]{tls}
"""


def gate(port, cert, key, htpasswd, groups, upstream_port=None, storage_root=None,
         backend=None):
    """registry-gate: a front of `upstream_port`, all-in-one on `storage_root`, or with
    the given `backend` sections."""
    if backend is None:
        backend = (f'[upstream]\nurl = "http://127.0.0.1:{upstream_port}"\n' if upstream_port
                   else f'[storage]\nroot = "{storage_root}"\n')
    return f"""\
# registry-gate for bench/run, thrown away after the run.
listen = "127.0.0.1:{port}"
watch_interval_ms = 60000

[tls]
certificate = "{cert}"
private_key = "{key}"

[auth]
htpasswd = "{htpasswd}"
groups = "{groups}"

{backend}
[log]
level = "warn"
"""
