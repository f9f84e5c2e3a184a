#!/bin/sh
# certbot deploy hook: tell registry-gate to load the renewed certificate now.
#
#   install -m 0755 deploy/certbot-deploy-hook.sh \
#       /etc/letsencrypt/renewal-hooks/deploy/registry-gate.sh
#
# certbot runs every executable in renewal-hooks/deploy/ after each successful
# renewal. The gate also notices the new files by itself within [watch_interval_ms];
# this makes the switch immediate and leaves a line in the journal.
#
# Quiet, idempotent, and harmless when the gate is not running (or not installed):
# it then does nothing and exits 0, so it never turns a renewal into a failure.
# Set REGISTRY_GATE_UNIT to use another unit name (default registry-gate.service).
# Containers: `docker kill --signal=HUP <container>` does the same (see README.md).

unit="${REGISTRY_GATE_UNIT:-registry-gate.service}"

command -v systemctl >/dev/null 2>&1 || exit 0
systemctl is-active --quiet "$unit" 2>/dev/null || exit 0

if ! systemctl reload "$unit"; then
    echo "registry-gate deploy hook: systemctl reload $unit failed" >&2
    exit 1
fi
exit 0
