#!/usr/bin/env bash
# A throwaway Redis server on 127.0.0.1 for the test suite; prints its URL on stdout.
#
#   BRIDGECANCEL_TEST_REDIS_URL=$(bash .ci/redis.sh)   # install if missing, start a server
#   bash .ci/redis.sh --no-install                     # never apt-get (what the tests run)
#   BRIDGECANCEL_REDIS_DIR=<folder> bash .ci/redis.sh --stop   # stop that folder's server
#
# Each server has a port and a folder of its own, so runs side by side on one machine
# never meet. The caller stops it: `.ci/run` on exit (a trap, so a failing run stops it
# too), the test session that started it at its end.
#
# Settings, from the environment:
#   BRIDGECANCEL_REDIS_DIR   folder (default: a new one from mktemp -d, named on stderr).
#                            Its server is started if down, reused if already running.
#   BRIDGECANCEL_REDIS_PORT  port on 127.0.0.1 (default: a free one)
# The server listens on loopback only, keeps nothing on disk (no snapshots, no append-only
# file) and runs as the calling user. Progress goes to stderr.
set -euo pipefail

dir=${BRIDGECANCEL_REDIS_DIR:-}
port=${BRIDGECANCEL_REDIS_PORT:-}
action=start
install=yes
for arg in "$@"; do
    case $arg in
        --no-install) install=no ;;
        --stop) action=stop ;;
        *) echo "redis.sh: unknown argument $arg (use --no-install or --stop)" >&2; exit 2 ;;
    esac
done

log() { echo "redis.sh: $*" >&2; }

# The server's pid, if the folder's server runs (its pid file names a redis-server).
running_pid() {
    local pid
    [ -f "$dir/redis.pid" ] || return 1
    pid=$(cat "$dir/redis.pid")
    case "$(cat "/proc/$pid/comm" 2>/dev/null)" in
        redis-server*) echo "$pid" ;;
        *) return 1 ;;
    esac
}

if [ "$action" = stop ]; then
    if [ -z "$dir" ]; then
        log "--stop needs BRIDGECANCEL_REDIS_DIR, the folder of the server to stop"
        exit 2
    fi
    pid=$(running_pid) || exit 0  # no server was started there (or it has stopped)
    kill -TERM "$pid"
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || exit 0
        sleep 0.05
    done
    log "the server of $dir (pid $pid) did not stop on SIGTERM within 5 s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    exit 0
fi

if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$install" = no ]; then
        log "no redis-server found; install Debian's redis-server package"
        exit 1
    fi
    log "installing Debian's redis-server package"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq redis-server >&2
fi

free_port() {  # a port nothing listens on now (the kernel's pick for a bind to port 0)
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The server answers PING on the port: ready.
answers() {
    python3 - "$1" <<'EOF'
import socket, sys
try:
    with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1) as s:
        s.sendall(b"PING\r\n")
        sys.exit(0 if s.recv(16).startswith(b"+PONG") else 1)
except OSError:
    sys.exit(1)
EOF
}

if [ -z "$dir" ]; then
    dir=$(mktemp -d "${TMPDIR:-/tmp}/bridgecancel-redis.XXXXXX")
    log "folder $dir (stop with: BRIDGECANCEL_REDIS_DIR=$dir bash $0 --stop)"
fi
mkdir -p "$dir"

if running_pid >/dev/null; then
    port=$(cat "$dir/port")
    log "reusing the server of $dir on 127.0.0.1:$port"
else
    # A free port can be taken by someone else before the server binds it: then try another.
    attempts=$([ -n "$port" ] && echo 1 || echo 3)
    started=no
    for attempt in $(seq "$attempts"); do
        [ -n "${BRIDGECANCEL_REDIS_PORT:-}" ] || port=$(free_port)
        log "starting the server of $dir on 127.0.0.1:$port"
        rm -f "$dir/redis.pid"
        redis-server --bind 127.0.0.1 --port "$port" --dir "$dir" --daemonize yes \
            --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" \
            --save "" --appendonly no >&2
        for _ in $(seq 100); do
            # Ours answering, not someone else's server on that port.
            if answers "$port" && running_pid >/dev/null; then
                started=yes
                break
            fi
            sleep 0.05
        done
        [ "$started" = yes ] && break
        if [ "$attempt" = "$attempts" ]; then
            log "the server did not start; its log ($dir/redis.log):"
            tail -n 20 "$dir/redis.log" >&2 || true
            exit 1
        fi
    done
    echo "$port" >"$dir/port"
fi
echo "redis://127.0.0.1:$port/0"
