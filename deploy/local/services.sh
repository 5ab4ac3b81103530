#!/usr/bin/env bash
# Make sure the local PostgreSQL and RabbitMQ that `just demo` / `just test`
# need are installed and running on this machine (Debian/Ubuntu).
#
# Idempotent: when both services are already up it only prints one line each.
#
# Overrides (skip install/start of the matching service):
#   SYNCFLEET_TEST_PG_URL    superuser URL of an existing PostgreSQL
#   SYNCFLEET_TEST_AMQP_URL  URL of an existing RabbitMQ
#
# `services.sh tools` only installs the test tools (pgbench, Prometheus).
set -euo pipefail

readonly PG_HOST=127.0.0.1
readonly PG_PORT=5432
readonly PG_DEFAULT_URL="postgres://postgres@${PG_HOST}:${PG_PORT}/postgres"
readonly PG_WAIT_SECS=30
readonly AMQP_HOST=127.0.0.1
readonly AMQP_PORT=5672
readonly RABBIT_WAIT_SECS=90
readonly HBA_MARKER="# syncfleet: trust local TCP connections (added by deploy/local/services.sh)"

LOG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/syncfleet-services.XXXXXX")"
readonly LOG_DIR
trap 'rm -rf "$LOG_DIR"' EXIT

export DEBIAN_FRONTEND=noninteractive

say() { printf '%s\n' "$*"; }
die() {
  printf 'services.sh: %s\n' "$*" >&2
  exit 1
}

# Print the tail of a log file to stderr (used right before failing).
show_log() {
  local file=$1
  if [[ -s $file ]]; then
    printf -- '--- last lines of %s ---\n' "$(basename "$file")" >&2
    tail -n 30 "$file" >&2 || true
    printf -- '---\n' >&2
  fi
}

have() { command -v "$1" >/dev/null 2>&1; }

# systemd running as PID 1? (containers usually have no systemd)
has_systemd() { [[ -d /run/systemd/system ]]; }

# Run a privileged command: directly as root, else through sudo.
as_root() {
  if [[ $EUID -eq 0 ]]; then
    "$@"
  elif have sudo; then
    sudo "$@"
  else
    die "need root privileges to run '$*', but this is not root and sudo is not installed.
Either run this script as root, install sudo, or install and start the services yourself:
  apt-get install -y postgresql postgresql-contrib rabbitmq-server
and allow trust auth for 127.0.0.1 in pg_hba.conf (or set SYNCFLEET_TEST_PG_URL / SYNCFLEET_TEST_AMQP_URL)."
  fi
}

can_be_root() { [[ $EUID -eq 0 ]] || have sudo; }

APT_UPDATED=0
apt_install() {
  have apt-get || die "apt-get not found; install these packages yourself: $*"
  local log="$LOG_DIR/apt.log"
  if [[ $APT_UPDATED -eq 0 ]]; then
    say "apt-get update ..."
    as_root apt-get update >>"$log" 2>&1 || {
      show_log "$log"
      die "apt-get update failed"
    }
    APT_UPDATED=1
  fi
  say "apt-get install -y $* ..."
  as_root apt-get install -y --no-install-recommends "$@" >>"$log" 2>&1 || {
    show_log "$log"
    die "apt-get install $* failed"
  }
}

# True if something accepts TCP connections on host:port.
port_open() {
  # shellcheck disable=SC2016 # expanded by the inner bash
  timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" >/dev/null 2>&1
}

# ---------------------------------------------------------------- PostgreSQL

pg_query_ok() {
  PGCONNECT_TIMEOUT=5 psql -w "$1" -tAc 'select 1' </dev/null 2>"$LOG_DIR/psql.err" | grep -qx 1
}

pg_ready() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT" >/dev/null 2>&1; }

# Prints "<version> <cluster>" of the cluster configured for $PG_PORT.
pg_cluster() {
  local found=""
  if have pg_lsclusters; then
    found="$(pg_lsclusters -h 2>/dev/null | awk -v p="$PG_PORT" '$3 == p { print $1, $2; exit }')"
  fi
  if [[ -z $found && -d /etc/postgresql ]]; then
    local ver
    ver="$(find /etc/postgresql -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | sort -V | head -n 1)"
    [[ -n $ver && -d /etc/postgresql/$ver/main ]] && found="$ver main"
  fi
  [[ -n $found ]] || return 1
  printf '%s\n' "$found"
}

pg_cluster_ctl() {
  # usage: pg_cluster_ctl <start|reload> <version> <cluster>
  if has_systemd; then
    as_root pg_ctlcluster "$2" "$3" "$1"
  else
    as_root pg_ctlcluster --skip-systemctl-redirect "$2" "$3" "$1"
  fi
}

pg_allow_trust() {
  local ver=$1 cluster=$2
  local hba="/etc/postgresql/$ver/$cluster/pg_hba.conf"
  as_root test -f "$hba" || die "cannot find $hba to configure trust auth"
  if ! as_root grep -qF "$HBA_MARKER" "$hba"; then
    say "postgres: allowing trust auth for 127.0.0.1/32 and ::1/128 in $hba"
    # Prepend (first matching line wins); `cat >` keeps owner and mode.
    # shellcheck disable=SC2016 # expanded by the inner bash
    as_root bash -c '
      set -euo pipefail
      tmp="$(mktemp)"
      { printf "%s\n" "$2" \
          "host    all    all    127.0.0.1/32    trust" \
          "host    all    all    ::1/128         trust" ""
        cat "$1"; } >"$tmp"
      cat "$tmp" >"$1"
      rm -f "$tmp"' _ "$hba" "$HBA_MARKER"
  fi
  pg_cluster_ctl reload "$ver" "$cluster" >>"$LOG_DIR/pg.log" 2>&1 || {
    show_log "$LOG_DIR/pg.log"
    die "could not reload PostgreSQL $ver/$cluster"
  }
}

ensure_postgres() {
  if [[ -n ${SYNCFLEET_TEST_PG_URL:-} ]]; then
    if ! have psql; then
      say "postgres: using SYNCFLEET_TEST_PG_URL (psql not installed, not checked)"
      return 0
    fi
    if ! pg_query_ok "$SYNCFLEET_TEST_PG_URL"; then
      show_log "$LOG_DIR/psql.err"
      die "cannot run 'select 1' via SYNCFLEET_TEST_PG_URL; check the URL and that the server is up"
    fi
    say "postgres: up (SYNCFLEET_TEST_PG_URL)"
    return 0
  fi

  local installed_now=0
  if ! have psql || ! have pg_isready || ! have pg_ctlcluster; then
    if port_open "$PG_HOST" "$PG_PORT" && ! have pg_ctlcluster; then
      # Some other PostgreSQL (e.g. a container) already owns the port:
      # only install the client tools, do not start a second server.
      say "postgres: something listens on $PG_HOST:$PG_PORT; installing client tools only"
      apt_install postgresql-client
    else
      say "postgres: not installed; installing"
      apt_install postgresql postgresql-contrib
      installed_now=1
    fi
  fi

  if ! pg_ready; then
    local cluster
    cluster="$(pg_cluster)" ||
      die "PostgreSQL is installed but no cluster for port $PG_PORT exists under /etc/postgresql;
create one, e.g.: pg_createcluster --port $PG_PORT <version> main"
    # shellcheck disable=SC2086 # "<version> <cluster>" is split on purpose
    set -- $cluster
    say "postgres: starting cluster $1/$2"
    pg_cluster_ctl start "$1" "$2" >>"$LOG_DIR/pg.log" 2>&1 || true # the wait below decides
    local waited=0
    until pg_ready; do
      if ((waited >= PG_WAIT_SECS)); then
        show_log "$LOG_DIR/pg.log"
        if have pg_lsclusters; then pg_lsclusters >&2 || true; fi
        die "PostgreSQL did not accept connections on $PG_HOST:$PG_PORT within ${PG_WAIT_SECS}s
(waited for: pg_isready -h $PG_HOST -p $PG_PORT; server log: /var/log/postgresql/postgresql-$1-$2.log)"
      fi
      sleep 1
      waited=$((waited + 1))
    done
  fi

  if [[ $installed_now -eq 1 ]]; then
    local cluster
    cluster="$(pg_cluster)" || die "cannot find the PostgreSQL cluster just installed"
    # shellcheck disable=SC2086 # "<version> <cluster>" is split on purpose
    pg_allow_trust $cluster
  fi

  if ! pg_query_ok "$PG_DEFAULT_URL"; then
    show_log "$LOG_DIR/psql.err"
    die "PostgreSQL is up on $PG_HOST:$PG_PORT but connecting as user postgres without a password failed.
Either allow trust auth for local TCP connections in pg_hba.conf, e.g.
  host    all    all    127.0.0.1/32    trust
  host    all    all    ::1/128         trust
and reload PostgreSQL, or set SYNCFLEET_TEST_PG_URL to a superuser URL, e.g.
  export SYNCFLEET_TEST_PG_URL=postgres://postgres:secret@127.0.0.1:5432/postgres"
  fi
  say "postgres: up on $PG_HOST:$PG_PORT"
}

# ------------------------------------------------------------------ RabbitMQ

# Parse host and port out of an amqp(s):// URL; prints "<host> <port>".
amqp_host_port() {
  local url=$1 port=5672
  [[ $url == amqps://* ]] && port=5671
  local rest=${url#*://}
  rest=${rest%%/*}
  rest=${rest%%\?*}
  rest=${rest##*@}
  local host=$rest
  if [[ $rest == \[*\]* ]]; then # [ipv6]:port
    host=${rest%%]*}
    host=${host#[}
    rest=${rest#*]}
    [[ $rest == :* ]] && port=${rest#:}
  elif [[ $rest == *:* ]]; then
    host=${rest%%:*}
    port=${rest##*:}
  fi
  printf '%s %s\n' "${host:-localhost}" "$port"
}

rabbit_ping() {
  # Needs root (the Debian wrappers re-exec as the rabbitmq user).
  can_be_root || return 0
  as_root timeout 20 rabbitmq-diagnostics -q ping >/dev/null 2>&1
}

rabbit_up() { port_open "$AMQP_HOST" "$AMQP_PORT" && rabbit_ping; }

ensure_rabbitmq() {
  if [[ -n ${SYNCFLEET_TEST_AMQP_URL:-} ]]; then
    local host port
    read -r host port < <(amqp_host_port "$SYNCFLEET_TEST_AMQP_URL")
    port_open "$host" "$port" ||
      die "nothing accepts connections on $host:$port (from SYNCFLEET_TEST_AMQP_URL)"
    say "rabbitmq: up on $host:$port (SYNCFLEET_TEST_AMQP_URL)"
    return 0
  fi

  if ! have rabbitmq-server; then
    say "rabbitmq: not installed; installing"
    apt_install rabbitmq-server
  fi

  if ! rabbit_up; then
    say "rabbitmq: starting"
    local log="$LOG_DIR/rabbitmq.log"
    if has_systemd; then
      as_root systemctl start rabbitmq-server >>"$log" 2>&1 || true
    else
      as_root rabbitmq-server -detached >>"$log" 2>&1 || true # the wait below decides
    fi
    local start=$SECONDS
    until rabbit_up; do
      if ((SECONDS - start >= RABBIT_WAIT_SECS)); then
        show_log "$log"
        die "RabbitMQ did not come up within ${RABBIT_WAIT_SECS}s
(waited for: a listener on $AMQP_HOST:$AMQP_PORT and 'rabbitmq-diagnostics -q ping'; logs: /var/log/rabbitmq/)"
      fi
      sleep 2
    done
  fi
  say "rabbitmq: up on $AMQP_HOST:$AMQP_PORT"
}

# Test tools: pgbench (the bench), Prometheus and promtool (the operations
# tests run a real Prometheus and check the alert rules).
ensure_tools() {
  local missing=()
  have pgbench || missing+=(postgresql-contrib)
  have prometheus && have promtool || missing+=(prometheus)
  if [[ ${#missing[@]} -gt 0 ]]; then
    can_be_root || die "missing tools; install: ${missing[*]}"
    apt_install "${missing[@]}"
  fi
  say "tools: pgbench, prometheus, promtool"
}

# `services.sh tools` installs only the test tools.
if [[ ${1:-} != tools ]]; then
  ensure_postgres
  ensure_rabbitmq
fi
ensure_tools
