#!/bin/sh
# Stand-in for the entrypoint of the official redis image: `redis-server ...` (compose's command) runs as the
# redis user in /data. The official image builds redis with protected mode off (the container network is the
# boundary); Debian's redis-server keeps it on, which refuses every client but loopback, so it is turned off here.
set -e
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
    set -- redis-server "$@"
fi
if [ "$1" = "redis-server" ]; then
    set -- "$@" --protected-mode no
    if [ "$(id -u)" = "0" ]; then
        find . \! -user redis -exec chown redis '{}' +
        exec setpriv --reuid=redis --regid=redis --init-groups "$@"
    fi
fi
exec "$@"
