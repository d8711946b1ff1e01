#!/usr/bin/env bash
# Local MQTT (Mosquitto) and Redis brokers for GenCLIP Inspect: development, demo and CI.
# Production brokers are run by the plant's IT; this script only serves one machine on loopback.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bash deploy/services.sh [--config PATH] {install|up|down|status}

  install   install mosquitto, mosquitto-clients, redis-server and jq with apt-get (as root)
            where one is missing, systemd if systemd-analyze is missing (the unit-file
            tests run `systemd-analyze verify`), and chromium if /usr/bin/chromium is missing
            (the live page's browser test drives it with Playwright; nothing downloads a
            browser); otherwise do nothing
  up        start Mosquitto and Redis on 127.0.0.1, on the ports of the config file:
            MQTT from [mqtt].port, Redis from [redis].url; already running = no-op
  down      stop what `up` started (by pid file); nothing running = no-op
  status    one line per broker; exit 0 if both ports accept connections, 3 otherwise

Options and environment:
  --config PATH        config file (default: $GENCLIP_CONFIG, else <repo>/config.toml)
  GENCLIP_STATE_DIR    pid files, broker configs, data and logs (default: <repo>/.run)
  PYTHON               interpreter used to read the config (needs tomllib, Python >= 3.11)
EOF
}

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# mosquitto lives in /usr/sbin on Debian, which is not on every user's PATH.
PATH="${PATH}:/usr/local/sbin:/usr/sbin:/sbin"
WAIT_S=10

die() {
    echo "services.sh: error: $*" >&2
    exit 1
}
warn() { echo "services.sh: warning: $*" >&2; }

# --- install ---------------------------------------------------------------------------------

cmd_install() {
    local missing=()
    command -v mosquitto >/dev/null 2>&1 || missing+=(mosquitto)
    command -v mosquitto_pub >/dev/null 2>&1 || missing+=(mosquitto-clients)
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    # tests/test_deploy_install.py checks deploy/systemd/ with `systemd-analyze verify`; a container has
    # no systemd, and Debian ships systemd-analyze in the systemd package.
    command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
    # tests/test_page_browser.py drives Debian's Chromium through Playwright (executable_path=/usr/bin/chromium).
    [[ -x /usr/bin/chromium ]] || missing+=(chromium)
    # docs/training.md's walk-through (run by tests/test_training_walkthrough.py) reads the line's info with
    # mosquitto_sub | jq and reloads it with mosquitto_rr.
    command -v jq >/dev/null 2>&1 || missing+=(jq)
    if [[ ${#missing[@]} -eq 0 ]]; then
        echo "mosquitto, mosquitto-clients, redis-server, systemd-analyze, jq and chromium are installed: nothing to do"
        return 0
    fi
    if [[ $(id -u) -ne 0 ]]; then
        die "missing packages: ${missing[*]}; installing them needs root:
    sudo bash deploy/services.sh install
or: sudo apt-get install -y ${missing[*]}"
    fi
    command -v apt-get >/dev/null 2>&1 ||
        die "apt-get not found: install ${missing[*]} with this system's package manager"
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
    command -v mosquitto >/dev/null 2>&1 || die "mosquitto still missing after apt-get install"
    command -v redis-server >/dev/null 2>&1 || die "redis-server still missing after apt-get install"
    command -v systemd-analyze >/dev/null 2>&1 || die "systemd-analyze still missing after apt-get install"
    [[ -x /usr/bin/chromium ]] || die "chromium still missing after apt-get install"
    command -v mosquitto_rr >/dev/null 2>&1 || die "mosquitto_rr (mosquitto-clients) still missing after apt-get install"
    command -v jq >/dev/null 2>&1 || die "jq still missing after apt-get install"
    echo "installed: $(mosquitto -h 2>/dev/null | head -n 1 || true); $(redis-server --version);" \
        "$(systemd-analyze --version | head -n 1)"
}

# --- configuration ---------------------------------------------------------------------------

find_python() {
    local candidate
    for candidate in "${PYTHON:-}" "${REPO_DIR}/.venv/bin/python" python3 python3.11 python3.12 python3.13; do
        [[ -n "$candidate" ]] || continue
        if "$candidate" -c 'import tomllib' >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    die "need Python >= 3.11 (tomllib) to read the config; set PYTHON=/path/to/python3.11"
}

# Prints "<mqtt port> <redis port>".
read_ports() {
    local config="$1" python
    python="$(find_python)"
    "$python" - "$config" <<'PY'
import sys
import tomllib
from urllib.parse import urlsplit

path = sys.argv[1]
try:
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
except (OSError, tomllib.TOMLDecodeError) as e:
    sys.exit(f"services.sh: error: cannot read config {path}: {e}")
mqtt = cfg.get("mqtt", {})
mqtt_port = int(mqtt.get("port", 1883))
url = urlsplit(cfg.get("redis", {}).get("url", "redis://127.0.0.1:6379/0"))
if url.scheme not in ("redis", "rediss"):
    sys.exit(f"services.sh: error: [redis].url must be redis:// or rediss://, not {url.scheme}://")
redis_port = url.port or 6379
loopback = ("127.0.0.1", "localhost", "::1")
if mqtt.get("host", "127.0.0.1") not in loopback or (url.hostname or "127.0.0.1") not in loopback:
    print("services.sh: warning: config points at a non-loopback broker; "
          "these local brokers listen on 127.0.0.1 only", file=sys.stderr)
print(mqtt_port, redis_port)
PY
}

# --- process helpers -------------------------------------------------------------------------

port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# A daemon's exit leaves a zombie until init reaps it, and some container inits reap late: zombies count as gone.
alive() {
    local state=""
    kill -0 "$1" 2>/dev/null || return 1
    if [[ -r "/proc/$1/stat" ]]; then
        state="$(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$1/stat" 2>/dev/null || true)"
    fi
    [[ "$state" != Z && "$state" != X ]]
}

# Prints the pid from the pid file if that process is alive and is the expected binary.
our_pid() {
    local pidfile="$1" binary="$2" pid comm
    [[ -r "$pidfile" ]] || return 1
    pid="$(tr -dc '0-9' <"$pidfile")"
    [[ -n "$pid" ]] && alive "$pid" || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null || ps -o comm= -p "$pid" 2>/dev/null || true)"
    [[ "$comm" == "$binary"* ]] || return 1
    echo "$pid"
}

wait_port() {
    local port="$1" pidfile="$2" binary="$3" log="$4" deadline=$((SECONDS + WAIT_S))
    while ((SECONDS < deadline)); do
        if port_open "$port"; then
            return 0
        fi
        sleep 0.2
    done
    echo "services.sh: error: $binary did not accept connections on 127.0.0.1:$port within ${WAIT_S}s" >&2
    if [[ -f "$log" ]]; then
        echo "--- last lines of $log ---" >&2
        tail -n 20 "$log" >&2
    fi
    exit 1
}

require_binary() {
    command -v "$1" >/dev/null 2>&1 ||
        die "$1 not found; install the brokers with: bash deploy/services.sh install"
}

# --- brokers ---------------------------------------------------------------------------------

write_mosquitto_conf() {
    local port="$1" dir="$STATE_DIR/mosquitto"
    mkdir -p "$dir/data"
    # Mosquitto 2 drops root to user "mosquitto", which cannot write our state dir: keep the caller's user.
    cat >"$dir/mosquitto.conf" <<EOF
# Generated by deploy/services.sh; edits are overwritten on the next 'up'.
user $(id -un)
pid_file $STATE_DIR/mosquitto.pid
per_listener_settings false
allow_anonymous true
listener $port 127.0.0.1
protocol mqtt
persistence true
persistence_location $dir/data/
autosave_interval 10
log_dest file $STATE_DIR/mosquitto.log
log_type error
log_type warning
log_type notice
log_type information
log_timestamp_format %Y-%m-%dT%H:%M:%S
EOF
}

write_redis_conf() {
    local port="$1" dir="$STATE_DIR/redis"
    mkdir -p "$dir/data"
    cat >"$dir/redis.conf" <<EOF
# Generated by deploy/services.sh; edits are overwritten on the next 'up'.
bind 127.0.0.1
port $port
protected-mode yes
daemonize yes
pidfile $STATE_DIR/redis.pid
logfile $STATE_DIR/redis.log
dir $dir/data
appendonly yes
# every acknowledged result is on disk before Redis answers: a Redis crash loses nothing the agent counted as sent
appendfsync always
EOF
}

start_service() {
    local name="$1" binary="$2" port="$3" pidfile="$STATE_DIR/$1.pid" log="$STATE_DIR/$1.log" pid
    if pid="$(our_pid "$pidfile" "$binary")"; then
        echo "$name: already running (pid $pid, port $port)"
        return 0
    fi
    rm -f "$pidfile"
    if port_open "$port"; then
        warn "$name: port $port is already used by another process; leaving it alone and using it as the broker"
        return 0
    fi
    require_binary "$binary"
    case "$name" in
    mosquitto)
        write_mosquitto_conf "$port"
        mosquitto -d -c "$STATE_DIR/mosquitto/mosquitto.conf" >>"$log" 2>&1 ||
            { tail -n 20 "$log" >&2; die "mosquitto failed to start"; }
        ;;
    redis)
        write_redis_conf "$port"
        redis-server "$STATE_DIR/redis/redis.conf" >>"$log" 2>&1 ||
            { tail -n 20 "$log" >&2; die "redis-server failed to start"; }
        ;;
    esac
    wait_port "$port" "$pidfile" "$binary" "$log"
    if ! pid="$(our_pid "$pidfile" "$binary")"; then
        tail -n 20 "$log" >&2
        die "$name: port $port answers but our $binary is not running (see $log)"
    fi
    echo "$name: started (pid $pid, port $port, log $log)"
}

stop_service() {
    local name="$1" binary="$2" pidfile="$STATE_DIR/$1.pid" pid deadline
    if ! pid="$(our_pid "$pidfile" "$binary")"; then
        rm -f "$pidfile"
        echo "$name: not running"
        return 0
    fi
    kill -TERM "$pid"
    deadline=$((SECONDS + WAIT_S))
    while alive "$pid" && ((SECONDS < deadline)); do
        sleep 0.1
    done
    if alive "$pid"; then
        warn "$name: pid $pid still alive after ${WAIT_S}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    echo "$name: stopped (pid $pid)"
}

# Prints one line; returns 0 if the port accepts connections.
status_service() {
    local name="$1" binary="$2" port="$3" pid
    if pid="$(our_pid "$STATE_DIR/$name.pid" "$binary")"; then
        if port_open "$port"; then
            echo "$name: running (pid $pid, port $port)"
            return 0
        fi
        echo "$name: started (pid $pid) but port $port does not accept connections"
        return 1
    fi
    if port_open "$port"; then
        echo "$name: port $port used by another process"
        return 0
    fi
    echo "$name: not running (port $port)"
    return 1
}

# --- main ------------------------------------------------------------------------------------

main() {
    local verb="" config="${GENCLIP_CONFIG:-$REPO_DIR/config.toml}"
    while (($#)); do
        case "$1" in
        -h | --help)
            usage
            return 0
            ;;
        --config)
            [[ $# -ge 2 ]] || die "--config needs a path"
            config="$2"
            shift 2
            ;;
        --config=*)
            config="${1#--config=}"
            shift
            ;;
        install | up | down | status)
            [[ -z "$verb" ]] || die "one verb at a time (got '$verb' and '$1')"
            verb="$1"
            shift
            ;;
        *)
            usage >&2
            die "unknown argument: $1"
            ;;
        esac
    done
    [[ -n "$verb" ]] || {
        usage >&2
        exit 2
    }
    if [[ "$verb" == install ]]; then
        cmd_install
        return
    fi

    [[ -f "$config" ]] || die "config file not found: $config (use --config PATH or GENCLIP_CONFIG)"
    local ports mqtt_port redis_port
    ports="$(read_ports "$config")"
    read -r mqtt_port redis_port <<<"$ports"
    STATE_DIR="${GENCLIP_STATE_DIR:-$REPO_DIR/.run}"
    mkdir -p "$STATE_DIR"
    STATE_DIR="$(cd "$STATE_DIR" && pwd)"

    case "$verb" in
    up)
        start_service mosquitto mosquitto "$mqtt_port"
        start_service redis redis-server "$redis_port"
        ;;
    down)
        stop_service mosquitto mosquitto
        stop_service redis redis-server
        ;;
    status)
        local rc=0
        status_service mosquitto mosquitto "$mqtt_port" || rc=3
        status_service redis redis-server "$redis_port" || rc=3
        return "$rc"
        ;;
    esac
}

main "$@"
