#!/usr/bin/env bash
# A throwaway PostgreSQL server on 127.0.0.1 for the test suite; prints its DSN on stdout.
#
#   BRIDGECANCEL_TEST_PG_DSN=$(bash .ci/postgres.sh)   # install if missing, start a server
#   bash .ci/postgres.sh --no-install                  # never apt-get (what the tests run)
#   BRIDGECANCEL_PG_DIR=<folder> bash .ci/postgres.sh --stop   # stop that folder's server
#
# Each server has a port and a data folder of its own, so runs side by side on one machine
# never meet. The caller stops it: `.ci/run` on exit (a trap, so a failing run stops it
# too), the test session that started it at its end.
#
# Settings, from the environment:
#   BRIDGECANCEL_PG_DIR   data folder (default: a new one from mktemp -d, named on stderr).
#                         Its server is started if down, reused if already running.
#   BRIDGECANCEL_PG_PORT  port on 127.0.0.1 (default: a free one)
# The server trusts local connections (a test database, bound to loopback only) and skips
# fsync: nothing in it is worth keeping. Progress goes to stderr.
set -euo pipefail

dir=${BRIDGECANCEL_PG_DIR:-}
port=${BRIDGECANCEL_PG_PORT:-}
user=bridgecancel
action=start
install=yes
for arg in "$@"; do
    case $arg in
        --no-install) install=no ;;
        --stop) action=stop ;;
        *) echo "postgres.sh: unknown argument $arg (use --no-install or --stop)" >&2; exit 2 ;;
    esac
done

log() { echo "postgres.sh: $*" >&2; }

if [ "$action" = stop ]; then
    if [ -z "$dir" ]; then
        log "--stop needs BRIDGECANCEL_PG_DIR, the data folder of the server to stop"
        exit 2
    fi
    if [ ! -f "$dir/postmaster.pid" ]; then
        exit 0  # no server was started there (or it has stopped)
    fi
fi

# The newest server binaries: Debian keeps them in /usr/lib/postgresql/<version>/bin, off
# PATH; elsewhere they are on PATH.
find_bin() {
    local found
    found=$(find /usr/lib/postgresql -maxdepth 3 -path '*/bin/pg_ctl' 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$found" ]; then
        dirname "$found"
    elif command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(command -v pg_ctl)"
    else
        return 1
    fi
}

if ! bin=$(find_bin); then
    if [ "$install" = no ] || [ "$action" = stop ]; then
        log "no PostgreSQL server binaries (pg_ctl) found; install Debian's postgresql package"
        exit 1
    fi
    log "installing Debian's postgresql package"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
    bin=$(find_bin)
fi

# initdb and the server refuse to run as root: run them as the postgres user then.
as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

if [ "$action" = stop ]; then
    as_owner "$bin/pg_ctl" -D "$dir" -m fast -w stop >&2
    exit 0
fi

free_port() {  # a port nothing listens on now (the kernel's pick for a bind to port 0)
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

if [ -z "$dir" ]; then
    dir=$(mktemp -d "${TMPDIR:-/tmp}/bridgecancel-pg.XXXXXX")
    log "data folder $dir (stop with: BRIDGECANCEL_PG_DIR=$dir bash $0 --stop)"
fi
if [ ! -f "$dir/PG_VERSION" ]; then
    log "creating a cluster in $dir"
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then
        chown postgres: "$dir"
    fi
    chmod 700 "$dir"
    as_owner "$bin/initdb" -D "$dir" -U "$user" --auth=trust -E UTF8 --no-sync >/dev/null
fi

if as_owner "$bin/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
    port=$(sed -n 4p "$dir/postmaster.pid")  # postmaster.pid's fourth line: the port
    log "reusing the server of $dir on 127.0.0.1:$port"
else
    # A lock file left by a server that was killed (the machine or the session ended):
    # if its pid is now some other process, the server would refuse to start.
    if [ -f "$dir/postmaster.pid" ]; then
        pid=$(head -n 1 "$dir/postmaster.pid")
        if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != postgres ]; then
            log "removing a stale lock file (pid $pid is not a postgres server)"
            rm -f "$dir/postmaster.pid"
        fi
    fi
    # A free port can be taken by someone else before the server binds it: then try another.
    attempts=$([ -n "$port" ] && echo 1 || echo 3)
    for attempt in $(seq "$attempts"); do
        [ -n "${BRIDGECANCEL_PG_PORT:-}" ] || port=$(free_port)
        log "starting the server of $dir on 127.0.0.1:$port"
        # The socket folder is the data folder: /var/run/postgresql may not exist or be ours.
        if as_owner "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 start -o \
            "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c full_page_writes=off" \
            >/dev/null; then
            break
        fi
        if [ "$attempt" = "$attempts" ]; then
            log "the server did not start; its log ($dir/server.log):"
            tail -n 20 "$dir/server.log" >&2 || true
            exit 1
        fi
    done
fi

psql_admin() { "$bin/psql" -X -q -h 127.0.0.1 -p "$port" -U "$user" -d postgres -tA "$@"; }
if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$user'")" != 1 ]; then
    psql_admin -c "CREATE DATABASE $user" >/dev/null
fi
echo "host=127.0.0.1 port=$port user=$user dbname=$user connect_timeout=5"
