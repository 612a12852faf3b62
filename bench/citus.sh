#!/usr/bin/env bash
# Rotation on a Citus cluster (issue 21's benchmark; docs/design.md, section
# 9), one run, release builds of ekm and Citus 13.2.2 (scripts/citus.sh) on
# PostgreSQL 15: a coordinator and two worker nodes on this machine, and a
# single server beside them. --rows rows (400,000) with two encrypted
# columns:
#   floor:      UPDATE t SET email = email, mobno = mobno through the
#               coordinator (Citus runs it on every shard at once);
#   cluster:    ekm_rotate() on the coordinator to done (each worker node
#               rotates its shards with its own worker);
#   one node:   ekm_rotate() to done on the single server, the same rows in
#               one ordinary table.
# Prints the times and the ratios. Every server runs with fsync on and
# autovacuum off, and the same settings.
#
#   bash bench/citus.sh [--rows N] [--no-build]
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=400000; BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --rows) ROWS=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    *) echo "usage: $0 [--rows N] [--no-build]" >&2; exit 2 ;;
  esac
done
export PATH="$HOME/.cargo/bin:$PATH"
if [ $BUILD -eq 1 ]; then
  bash scripts/setup.sh
  bash scripts/citus.sh
fi
source scripts/lib.sh
[ $BUILD -eq 1 ] && ekm_install --release >/dev/null
base=/tmp/ekm-cbench
ports=(61481 61482 61483 61484)   # coordinator, worker 1, worker 2, the single server
trap 'for n in 0 1 2 3; do cluster_stop "$base$n" immediate >/dev/null 2>&1 || true; done' EXIT
rm -rf "$base.key"; mkdir -p "$base.key"
python3 -c "import os, sys; sys.stdout.write(os.urandom(32).hex())" >"$base.key/master.key"
chmod 600 "$base.key/master.key"
[ "$(id -u)" -eq 0 ] && chown -R "$EKM_PG_USER" "$base.key"
common=("max_prepared_transactions = 20" "wal_level = logical" "ekm.master_key_file = '$base.key/master.key'"
        "shared_buffers = '512MB'" "jit = off" "autovacuum = off" "fsync = on" "max_wal_size = '2GB'")
for n in 0 1 2; do
  cluster_start "$base$n" "${ports[$n]}" "shared_preload_libraries = 'citus,ekm'" "citus.node_conninfo = 'sslmode=disable'" "${common[@]}" \
    && cpsql "$base$n" "${ports[$n]}" -d postgres -q -c "CREATE DATABASE app" \
    && cpsql "$base$n" "${ports[$n]}" -d app -q -c "CREATE EXTENSION citus" || exit 1
done
cluster_start "$base"3 "${ports[3]}" "${common[@]}" && cpsql "$base"3 "${ports[3]}" -d postgres -q -c "CREATE DATABASE app" || exit 1
c() { cpsql "${base}0" "${ports[0]}" -d app -At -q -c "$1"; }
one() { cpsql "${base}3" "${ports[3]}" -d app -At -q -c "$1"; }
now() { date +%s.%N; }
# rotate_timed c|one: ekm_rotate() to done on the coordinator (c) or the
# single server (one); sets JOB and SECS
rotate_timed() {
  local t0 state
  t0=$(now)
  JOB=$("$1" "SELECT DISTINCT job_id FROM ekm_rotate(force => true) WHERE job_id IS NOT NULL")
  state=$("$1" "SELECT state FROM ekm_rotation_wait($JOB, 3600)" 2>/dev/null | tail -n 1)
  SECS=$(python3 -c "print($(now) - $t0)")
  [ "$state" = done ] || echo "job $JOB ($1) ended $state"
}
c "SELECT citus_set_coordinator_host('127.0.0.1', ${ports[0]})" >/dev/null
c "SELECT citus_add_node('127.0.0.1', ${ports[1]})" >/dev/null
c "SELECT citus_add_node('127.0.0.1', ${ports[2]})" >/dev/null
c "CREATE EXTENSION ekm" >/dev/null
one "CREATE EXTENSION ekm" >/dev/null
load="INSERT INTO t SELECT g, ekm_encrypt('cust' || lpad(g::text, 9, '0') || '@example.com', 't.email'),
                          ekm_encrypt('+91' || lpad(g::text, 10, '0'), 't.mobno') FROM generate_series(1, $ROWS) g"
c "CREATE TABLE t (id int PRIMARY KEY, email text, mobno text)" >/dev/null
c "SELECT create_distributed_table('t', 'id')" >/dev/null
c "$load" >/dev/null
c "VACUUM ANALYZE t" >/dev/null
one "CREATE TABLE t (id int PRIMARY KEY, email text, mobno text)" >/dev/null
one "$load" >/dev/null
one "VACUUM ANALYZE t" >/dev/null
c "CHECKPOINT" >/dev/null; one "CHECKPOINT" >/dev/null
for n in 1 2; do cpsql "$base$n" "${ports[$n]}" -d app -q -c "CHECKPOINT" >/dev/null; done

echo "== ekm rotation on a Citus cluster: $ROWS rows x 2 columns, a coordinator and 2 worker nodes ($(nproc) cores)"
t0=$(now); c "UPDATE t SET email = email, mobno = mobno" >/dev/null; t1=$(now)
floor=$(python3 -c "print($t1 - $t0)")
c "VACUUM t" >/dev/null
c "SELECT ekm_register_column('t', 'email', 't.email'), ekm_register_column('t', 'mobno', 't.mobno')" >/dev/null
rotate_timed c; job=$JOB; cluster=$SECS
moved=$(c "SELECT rows_done FROM ekm_rotation_wait($job, 1)" 2>/dev/null | tail -n 1)
nodes=$(c "SELECT string_agg('  worker node ' || nodeport || ': ' || result, E'\n' ORDER BY nodeport) FROM run_command_on_workers(
  \$\$SELECT 'its part verified ' || round(extract(epoch FROM verified_at - switched_at)::numeric, 2) || ' s after it started, ' || rows_done || ' values'
     FROM ekm.rotation_job WHERE coordinator_job = $job\$\$)")
one "SELECT ekm_register_column('t', 'email', 't.email'), ekm_register_column('t', 'mobno', 't.mobno')" >/dev/null
rotate_timed one; single=$SECS
# the same two rotations without the vacuum behind the batches (a shard is
# a small table: its batches shrink to ekm.rotation_vacuum_growth of it and
# it is vacuumed about 1 / growth times, like any table)
for n in 0 1 2 3; do
  cpsql "$base$n" "${ports[$n]}" -d app -q -c "ALTER SYSTEM SET ekm.rotation_vacuum_growth = 0" -c "SELECT pg_reload_conf()" >/dev/null
done
sleep 0.5
rotate_timed c; cluster0=$SECS
rotate_timed one; single0=$SECS
vac=$(c "SELECT string_agg(result, ' + ' ORDER BY nodeport) FROM run_command_on_workers(\$\$SELECT vacuums FROM ekm.rotation_job WHERE coordinator_job = $job\$\$)")
printf '%-64s %8.2f s\n' "floor: UPDATE t SET c = c through the coordinator" "$floor"
printf '%-64s %8.2f s  (%s values)\n' "ekm_rotate on the cluster (2 worker nodes)" "$cluster" "$moved"
echo "$nodes"
printf '%-64s %8.2f s\n' "ekm_rotate on one node (the same rows)" "$single"
echo "  (vacuums behind the batches on the worker nodes: $vac, for $(c "SELECT count(*) FROM pg_dist_shard WHERE logicalrelid = 't'::regclass") shards)"
printf '%-64s %8.2f s\n' "ekm_rotate on the cluster, rotation_vacuum_growth = 0" "$cluster0"
printf '%-64s %8.2f s\n' "ekm_rotate on one node, rotation_vacuum_growth = 0" "$single0"
python3 - "$floor" "$cluster" "$single" "$cluster0" "$single0" <<'PY'
import sys
floor, cluster, single, cluster0, single0 = map(float, sys.argv[1:])
print(f"default settings: cluster vs one node {single / cluster:.2f}x faster; cluster vs the floor {cluster / floor:.2f}x its time")
print(f"rotation_vacuum_growth = 0: cluster vs one node {single0 / cluster0:.2f}x faster; cluster vs the floor {cluster0 / floor:.2f}x its time")
PY
