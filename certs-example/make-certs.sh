#!/usr/bin/env bash
# Make a throw-away certificate authority and a server certificate for
# `localhost`, `127.0.0.1` and `::1`, for trying registry-gate on one machine.
# NEVER use these files in production: see README.md beside this script.
#
# Usage: make-certs.sh [--rsa] [--force] [DIR]
#   DIR      where to write the files (default: the directory of this script)
#   --rsa    RSA-2048 keys instead of ECDSA P-256
#   --force  overwrite files that already exist
#
# Writes: ca.crt ca.key (the CA), fullchain.pem (leaf + CA), privkey.pem (leaf key),
# and trust/ca.crt: a directory holding only the CA certificate, for
# `skopeo --cert-dir` and `podman --cert-dir` (which refuse a directory that also
# holds ca.key: "missing client certificate ca.cert for key ca.key").
# Needs only the openssl command line tool.
set -euo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }

algo=ec
force=no
dir=""
for arg in "$@"; do
    case "$arg" in
        --rsa) algo=rsa ;;
        --force) force=yes ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "make-certs.sh: unknown option $arg" >&2; usage >&2; exit 2 ;;
        *)
            if [[ -n "$dir" ]]; then
                echo "make-certs.sh: only one directory, please" >&2; exit 2
            fi
            dir="$arg" ;;
    esac
done
if [[ -z "$dir" ]]; then
    dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fi

command -v openssl >/dev/null || { echo "make-certs.sh: openssl not found: apt-get install openssl" >&2; exit 1; }
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
cd "$dir"

outputs=(ca.crt ca.key fullchain.pem privkey.pem)
existing=()
for f in "${outputs[@]}"; do
    [[ -e "$f" ]] && existing+=("$f")
done

# trust/ holds only a copy of ca.crt (written through a temporary name).
write_trust_dir() {
    mkdir -p "$dir/trust"
    cp "$dir/ca.crt" "$dir/trust/.ca.crt.tmp"
    mv -f "$dir/trust/.ca.crt.tmp" "$dir/trust/ca.crt"
}

if [[ ${#existing[@]} -gt 0 && "$force" != yes ]]; then
    # Made by an older version of this script: add the trust directory.
    if [[ -f ca.crt && ! -e trust/ca.crt ]]; then
        write_trust_dir
        echo "make-certs.sh: wrote trust/ca.crt (a copy of ca.crt) in $dir"
    fi
    echo "make-certs.sh: ${existing[*]} already in $dir; nothing else changed (use --force to replace)"
    exit 0
fi

newkey() {
    if [[ "$algo" == rsa ]]; then
        openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$1" 2>/dev/null
    else
        openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"
    fi
    chmod 600 "$1"
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The CA: self-signed, may sign only leaf certificates.
newkey "$work/ca.key"
openssl req -x509 -new -key "$work/ca.key" -sha256 -days 825 \
    -subj "/CN=registry-gate throw-away test CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$work/ca.crt"

# The server certificate for this machine's loopback names.
newkey "$work/privkey.pem"
openssl req -new -key "$work/privkey.pem" -subj "/CN=localhost" -out "$work/leaf.csr"
cat > "$work/leaf.ext" <<'EXT'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1
EXT
openssl x509 -req -in "$work/leaf.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" \
    -CAcreateserial -days 365 -sha256 -extfile "$work/leaf.ext" -out "$work/leaf.crt" 2>/dev/null
cat "$work/leaf.crt" "$work/ca.crt" > "$work/fullchain.pem"

# Move into place only when everything was made.
for f in "${outputs[@]}"; do
    mv -f "$work/$f" "$dir/$f"
done
write_trust_dir
echo "make-certs.sh: wrote ${outputs[*]} trust/ca.crt ($algo) in $dir"
echo "  trust it: curl --cacert $dir/ca.crt"
echo "            skopeo and podman: --cert-dir $dir/trust"
echo "            docker: copy ca.crt to /etc/docker/certs.d/localhost:5043/ca.crt"
