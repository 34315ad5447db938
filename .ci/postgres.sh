#!/usr/bin/env bash
# A throwaway PostgreSQL server on 127.0.0.1 for the test suite; prints its DSN on stdout.
#
#   BRIDGECANCEL_TEST_PG_DSN=$(bash .ci/postgres.sh)   # install if missing, start if down
#   bash .ci/postgres.sh --no-install                  # never apt-get (what the tests run)
#   bash .ci/postgres.sh --stop                        # stop the server this script started
#
# The server keeps running after the script exits (and after the tests), so the next run
# and concurrent runs reuse it; stop it with --stop.
#
# Idempotent: a server already answering on the port is reused as it is; a data folder
# left by an earlier run is started again. Settings, from the environment:
#   BRIDGECANCEL_PG_PORT  port on 127.0.0.1 (default 54329, away from a system cluster)
#   BRIDGECANCEL_PG_DIR   data folder (default ${TMPDIR:-/tmp}/bridgecancel-pg-<port>)
# The server trusts local connections (a test database, bound to loopback only) and skips
# fsync: nothing in it is worth keeping. Progress goes to stderr.
set -euo pipefail

port=${BRIDGECANCEL_PG_PORT:-54329}
dir=${BRIDGECANCEL_PG_DIR:-${TMPDIR:-/tmp}/bridgecancel-pg-$port}
user=bridgecancel
dsn="host=127.0.0.1 port=$port user=$user dbname=$user connect_timeout=5"
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
    if [ -f "$dir/postmaster.pid" ]; then
        as_owner "$bin/pg_ctl" -D "$dir" -m fast -w stop >&2
    fi
    exit 0
fi

if "$bin/pg_isready" -q -h 127.0.0.1 -p "$port"; then
    log "reusing the server on 127.0.0.1:$port"
else
    if [ ! -f "$dir/PG_VERSION" ]; then
        log "creating a cluster in $dir"
        mkdir -p "$dir"
        if [ "$(id -u)" = 0 ]; then
            chown postgres: "$dir"
        fi
        chmod 700 "$dir"
        as_owner "$bin/initdb" -D "$dir" -U "$user" --auth=trust -E UTF8 --no-sync >/dev/null
    fi
    # A lock file left by a server that was killed (the machine or the session ended):
    # if its pid is now some other process, the server would refuse to start.
    if [ -f "$dir/postmaster.pid" ]; then
        pid=$(head -n 1 "$dir/postmaster.pid")
        if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != postgres ]; then
            log "removing a stale lock file (pid $pid is not a postgres server)"
            rm -f "$dir/postmaster.pid"
        fi
    fi
    log "starting the server on 127.0.0.1:$port"
    # The socket folder is the data folder: /var/run/postgresql may not exist or be ours.
    if ! as_owner "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 start -o \
        "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c full_page_writes=off" \
        >/dev/null; then
        log "the server did not start; its log ($dir/server.log):"
        tail -n 20 "$dir/server.log" >&2 || true
        exit 1
    fi
fi

psql_admin() { "$bin/psql" -X -q -h 127.0.0.1 -p "$port" -U "$user" -d postgres -tA "$@"; }
if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$user'")" != 1 ]; then
    psql_admin -c "CREATE DATABASE $user" >/dev/null
fi
echo "$dsn"
