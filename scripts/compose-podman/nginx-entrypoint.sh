#!/bin/sh
# Stand-in for the entrypoint of the official nginx image: for `nginx ...` (its default command) it first runs every
# executable *.sh in /docker-entrypoint.d/, in version order, and stops the container if one fails; compose mounts
# nginx/trusted-proxies.sh there, which writes the trusted-proxies file nginx.conf includes.
set -e
if [ "$1" = "nginx" ] || [ "$1" = "nginx-debug" ]; then
    find /docker-entrypoint.d/ -follow -type f -name '*.sh' -print 2>/dev/null | sort -V | while read -r f; do
        if [ -x "$f" ]; then
            echo "$0: Launching $f"
            "$f"
        else
            echo "$0: Ignoring $f, not executable"
        fi
    done
fi
exec "$@"
