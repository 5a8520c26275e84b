#!/bin/sh
# Writes nginx's trusted proxies from TRUSTED_PROXIES: one `set_real_ip_from` line per address or CIDR (comma or
# space separated; empty: none, so nginx trusts nobody and every client is the connection's own address).
# nginx/nginx.conf includes the file this writes (/etc/nginx/llamaq/trusted-proxies.conf, or the path given as $1).
# The nginx image runs it at container start from /docker-entrypoint.d/ (docker-compose.yml and deploy/k8s/nginx.yaml
# mount it there); scripts/nginx_local.py renders the same lines for the tests (tests/test_client_address.py checks
# that the two agree). A bad entry stops the container rather than start nginx trusting the wrong addresses.
set -eu
set -f  # no globbing of the entries

out="${1:-/etc/nginx/llamaq/trusted-proxies.conf}"
mkdir -p "$(dirname "$out")"
trap 'rm -f "$out.tmp"' EXIT
{
    echo "# Written at start-up by 40-llamaq-trusted-proxies.sh from TRUSTED_PROXIES; edits are lost."
    for entry in $(printf '%s' "${TRUSTED_PROXIES:-}" | tr ',' ' '); do
        case "$entry" in
            *[!0-9A-Fa-f.:/]*)
                echo "$0: TRUSTED_PROXIES: '$entry' is not an IP address or CIDR" >&2
                exit 1
                ;;
        esac
        printf 'set_real_ip_from %s;\n' "$entry"
    done
} > "$out.tmp"
mv "$out.tmp" "$out"
echo "$0: trusted proxies: ${TRUSTED_PROXIES:-none (every client is the connecting address)}"
