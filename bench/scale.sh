#!/usr/bin/env bash
# Rotation at production scale: one run, one throwaway cluster (and a
# streaming standby for part C). Prints:
#   A. heap + TOAST growth and time per method, 200,000 rows x 2 columns,
#      batches of 1,000 rows: the floor (UPDATE t SET c = c) without a vacuum
#      and with a VACUUM every N batches (N as ekm derives it: the paired
#      floor), a do-it-yourself pgcrypto rotation, ekm with its vacuum cadence
#      (the default) and without (ekm.rotation_vacuum_growth = 0);
#   B. the application's TPS during a rotation as a share of its TPS without
#      one (pgbench, 4 clients, each transaction decrypts one row and writes
#      it back re-encrypted; 2,000,000 rows x 2 columns), at the default
#      settings and with ekm.rotation_target_app_share = 0.8, with the
#      rotation's time in each case;
#   C. the largest replay lag of a streaming standby during a rotation, with
#      and without ekm.rotation_max_replica_lag;
#   D. a partitioned table (4 partitions, --part-rows rows x 2 columns)
#      rotated with ekm.rotation_workers = 1 and 2, against the single-session
#      floor (batches of UPDATE t SET c = c, partition by partition).
#
#   E. one table of --part-rows rows x 2 columns rotated with 1 and 2
#      workers (block ranges of the one table), against the same floor.
#   --workers-only runs D and E alone, --tps-only B alone.
#
#   bash bench/scale.sh [--rows N] [--tps-rows N] [--part-rows N] [--no-build] [--skip-tps] [--workers-only] [--tps-only]
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=200000; TPS_ROWS=2000000; PART_ROWS=1000000; BUILD=1; TPS=1; ONLY_WORKERS=0; ONLY_TPS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --rows) ROWS=$2; shift 2 ;;
    --tps-rows) TPS_ROWS=$2; shift 2 ;;
    --part-rows) PART_ROWS=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --skip-tps) TPS=0; shift ;;
    --workers-only) ONLY_WORKERS=1; shift ;;
    --tps-only) ONLY_TPS=1; shift ;;
    *) echo "usage: $0 [--rows N] [--tps-rows N] [--part-rows N] [--no-build] [--skip-tps] [--workers-only] [--tps-only]" >&2; exit 2 ;;
  esac
done
export PATH="$HOME/.cargo/bin:$PATH"
[ $BUILD -eq 1 ] && bash scripts/setup.sh
source scripts/lib.sh
[ $BUILD -eq 1 ] && ekm_install --release
dir=/tmp/ekm-sbench; port=61456
sdir=/tmp/ekm-sbench-standby; sport=61457
trap 'cluster_stop "$sdir" immediate >/dev/null 2>&1 || true; cluster_stop "$dir" >/dev/null 2>&1 || true' EXIT
# autovacuum off: only the vacuums a method runs itself count
cluster_start "$dir" "$port" "shared_buffers = '2GB'" "max_wal_size = '4GB'" "jit = off" "autovacuum = off" "fsync = on" \
  "wal_level = replica" "max_wal_senders = 4" || exit 1
q() { cpsql "$dir" "$port" -d postgres -At -q "$@"; }
now() { date +%s.%N; }
size() { q -c "SELECT pg_relation_size('$1') + coalesce(pg_total_relation_size(nullif(reltoastrelid, 0)), 0) FROM pg_class WHERE oid = '$1'::regclass"; }
pct() { python3 -c "print(f'{100.0 * ($2 - $1) / $1:+.1f}%')"; }
# the job id first: a wait whose statement reads a table keeps its snapshot
# (and with it the vacuum behind the batches) for the whole wait
wait_job() { local j; j=$(q -c "SELECT max(job_id) FROM ekm.rotation_job"); q -c "SELECT state FROM ekm_rotation_wait($j, 3600)" 2>/dev/null; }
reload() { q -c "SELECT pg_reload_conf()" >/dev/null; sleep 0.3; }

batches() {  # table, SET clause, vacuum every (0: never)[, rows] -> a psql script
  local n=$(( (${4:-$ROWS} + 999) / 1000 )) i
  for i in $(seq 0 $((n - 1))); do
    echo "UPDATE $1 SET $2 WHERE id > $((i * 1000)) AND id <= $(((i + 1) * 1000));"
    if [ "$3" -gt 0 ] && [ $(((i + 1) % $3)) -eq 0 ]; then echo "VACUUM (TRUNCATE false) $1;"; fi
  done
  [ "$3" -gt 0 ] && echo "VACUUM (TRUNCATE false) $1;"
  return 0
}

q -c "CREATE EXTENSION ekm" >/dev/null
if [ $ONLY_WORKERS -eq 0 ]; then
if [ $ONLY_TPS -eq 0 ]; then
echo "== A. heap and TOAST growth, $ROWS rows x 2 columns, batches of 1,000 rows"
q <<SQL
CREATE EXTENSION pgcrypto;
CREATE TABLE k AS SELECT decode(repeat('5a', 32), 'hex') AS old_key, decode(repeat('a5', 32), 'hex') AS new_key;
CREATE TABLE t_ekm (id int PRIMARY KEY, email text, mobno text);
INSERT INTO t_ekm SELECT g, ekm_encrypt('cust' || lpad(g::text, 9, '0') || '@example.com', 'e'), ekm_encrypt('+91' || lpad(g::text, 10, '0'), 'm')
FROM generate_series(1, $ROWS) g;
CREATE TABLE t_floor (LIKE t_ekm INCLUDING ALL); INSERT INTO t_floor SELECT * FROM t_ekm;
CREATE TABLE t_floor_vac (LIKE t_ekm INCLUDING ALL); INSERT INTO t_floor_vac SELECT * FROM t_ekm;
CREATE TABLE t_cbc (id int PRIMARY KEY, email bytea, mobno bytea);
INSERT INTO t_cbc SELECT g,
  (SELECT x.iv || encrypt_iv(convert_to('cust' || lpad(g::text, 9, '0') || '@example.com', 'UTF8'), k.old_key, x.iv, 'aes-cbc') FROM (SELECT gen_random_bytes(16) AS iv, g) x),
  (SELECT x.iv || encrypt_iv(convert_to('+91' || lpad(g::text, 10, '0'), 'UTF8'), k.old_key, x.iv, 'aes-cbc') FROM (SELECT gen_random_bytes(16) AS iv, g) x)
FROM generate_series(1, $ROWS) g, k;
VACUUM ANALYZE;
SQL
# ekm's cadence for this table: floor(0.02 x blocks / blocks per batch)
every=$(q -c "SELECT greatest(1, floor(0.02 * relpages / greatest(1, round(1000.0 / (reltuples / relpages)))))::int FROM pg_class WHERE relname = 't_floor_vac'")
declare -A T B A
run_sql() {  # name table set every
  B[$1]=$(size "$2"); local t0; t0=$(now)
  batches "$2" "$3" "$4" | q >/dev/null
  T[$1]=$(python3 -c "print($(now) - $t0)"); A[$1]=$(size "$2")
}
run_ekm() {  # name table
  B[$1]=$(size "$2"); local t0; t0=$(now)
  q -c "SELECT DISTINCT job_id FROM ekm_rotate(force => true)" >/dev/null
  [ "$(wait_job)" = done ] || { echo "ekm job failed"; exit 1; }
  T[$1]=$(python3 -c "print($(now) - $t0)"); A[$1]=$(size "$2")
  q -c "SELECT ekm_unregister_column('$2', 'email'), ekm_unregister_column('$2', 'mobno')" >/dev/null
}
run_sql floor t_floor "email = email, mobno = mobno" 0
run_sql floor_vac t_floor_vac "email = email, mobno = mobno" "$every"
run_sql cbc t_cbc "email = (SELECT x.iv || encrypt_iv(decrypt_iv(substring(email from 17), k.old_key, substring(email from 1 for 16), 'aes-cbc'), k.new_key, x.iv, 'aes-cbc') FROM (SELECT gen_random_bytes(16) AS iv) x, k), mobno = (SELECT x.iv || encrypt_iv(decrypt_iv(substring(mobno from 17), k.old_key, substring(mobno from 1 for 16), 'aes-cbc'), k.new_key, x.iv, 'aes-cbc') FROM (SELECT gen_random_bytes(16) AS iv) x, k)" 0
q -c "SELECT ekm_register_column('t_ekm', 'email', 'e'), ekm_register_column('t_ekm', 'mobno', 'm')" >/dev/null
run_ekm ekm t_ekm
vacuums=$(q -c "SELECT vacuums FROM ekm.rotation_job ORDER BY job_id DESC LIMIT 1")
# the same rows, now on the active key, loaded the same way
q -c "CREATE TABLE t_ekm0 (LIKE t_ekm INCLUDING ALL)" -c "INSERT INTO t_ekm0 SELECT * FROM t_ekm ORDER BY id" -c "VACUUM ANALYZE t_ekm0" >/dev/null
q -c "ALTER SYSTEM SET ekm.rotation_vacuum_growth = 0" >/dev/null; reload
q -c "SELECT ekm_register_column('t_ekm0', 'email', 'e'), ekm_register_column('t_ekm0', 'mobno', 'm')" >/dev/null
run_ekm ekm_novac t_ekm0
q -c "ALTER SYSTEM RESET ekm.rotation_vacuum_growth" >/dev/null; reload
printf '%-44s %9s %12s %12s %9s %9s\n' method seconds "size before" "size after" growth "x floor+vac"
for m in floor floor_vac cbc ekm ekm_novac; do
  case $m in
    floor) label="floor, no vacuum" ;;
    floor_vac) label="floor, VACUUM every $every batches (paired)" ;;
    cbc) label="pgcrypto DIY (AES-256-CBC), no vacuum" ;;
    ekm) label="ekm_rotate, vacuum cadence ($vacuums vacuums)" ;;
    ekm_novac) label="ekm_rotate, rotation_vacuum_growth = 0" ;;
  esac
  printf '%-44s %9.2f %12s %12s %9s %9.2f\n' "$label" "${T[$m]}" "${B[$m]}" "${A[$m]}" "$(pct "${B[$m]}" "${A[$m]}")" \
    "$(python3 -c "print(${T[$m]} / ${T[floor_vac]})")"
done
# what bounding the growth costs: ekm with its cadence against ekm without,
# beside the paired floor against the floor (the cryptography's own cost,
# the same in both ekm runs, is left out of this ratio)
printf 'the vacuum cadence costs ekm %.2fx its time without it; vacuums cost the floor %.2fx\n' \
  "$(python3 -c "print(${T[ekm]} / ${T[ekm_novac]})")" "$(python3 -c "print(${T[floor_vac]} / ${T[floor]})")"

fi  # A
if [ $TPS -eq 1 ]; then
  echo
  echo "== B. application TPS during a rotation, $TPS_ROWS rows x 2 columns, pgbench -c 4"
  q <<SQL
CREATE TABLE people (id int PRIMARY KEY, email text, ssn text);
INSERT INTO people SELECT g, ekm_encrypt('user' || g || '@example.com', 'people.email'), ekm_encrypt(lpad(g::text, 9, '0'), 'people.ssn')
FROM generate_series(1, $TPS_ROWS) g;
VACUUM ANALYZE people;
SELECT ekm_register_column('people', 'email', 'people.email'), ekm_register_column('people', 'ssn', 'people.ssn');
SQL
  cat >"$dir/app.sql" <<SQL
\set id random(1, $TPS_ROWS)
UPDATE people SET email = ekm_encrypt(ekm_decrypt(email, 'people.email'), 'people.email') WHERE id = :id;
SQL
  [ "$(id -u)" -eq 0 ] && chown "$EKM_PG_USER" "$dir/app.sql"
  pgb() { as_pg "$PGBIN/pgbench" -h "$dir" -p "$port" -U postgres -n -c 4 -j 2 -f "$dir/app.sql" "$@" postgres; }
  # the share is against the TPS measured right before each run, from the
  # same state (the application's own updates, with autovacuum off, leave
  # dead rows behind that slow it down from run to run)
  baseline() {
    q -c "VACUUM people" -c "CHECKPOINT" >/dev/null
    base=$(pgb -T 15 2>/dev/null | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
    echo "without a rotation, right before: $base TPS"
  }
  during() {  # label: TPS over the rotation's run, and its time
    baseline
    # pgbench itself writes its pid: $! would be the subshell that runs it
    # (through runuser as root), and killing that left pgbench running, its
    # load in every later measurement
    as_pg sh -c 'echo $$ >"$0"; exec "$@"' "$dir/pgb.pid" "$PGBIN/pgbench" -h "$dir" -p "$port" -U postgres -n -c 4 -j 2 \
      -f "$dir/app.sql" -T 3600 -P 1 postgres >"$dir/pgb.out" 2>&1 &
    local pid=$! t0 t1 r0 r1
    sleep 5
    t0=$(now); r0=$(grep -c '^progress' "$dir/pgb.out" || true)
    q -c "SELECT DISTINCT job_id FROM ekm_rotate(force => true)" >/dev/null
    [ "$(wait_job)" = done ] || echo "ekm job failed"
    t1=$(now); r1=$(grep -c '^progress' "$dir/pgb.out" || true)
    kill "$(cat "$dir/pgb.pid")" 2>/dev/null; wait "$pid" 2>/dev/null || true
    local tps
    tps=$(grep '^progress' "$dir/pgb.out" | sed -n "$((r0 + 1)),${r1}p" | sed 's/.* \([0-9.]*\) tps.*/\1/' | python3 -c "import sys; v=[float(x) for x in sys.stdin if x.strip()]; print(f'{sum(v)/len(v):.0f}' if v else 'n/a')")
    printf '%-52s %7s TPS  share %5s  rotation %6.1f s\n' "$1" "$tps" "$(python3 -c "print(f'{$tps / $base:.0%}')" 2>/dev/null || echo n/a)" "$(python3 -c "print($t1 - $t0)")"
  }
  during "during ekm_rotate, default settings"
  q -c "ALTER SYSTEM SET ekm.rotation_target_app_share = 0.8" >/dev/null; reload
  during "during ekm_rotate, rotation_target_app_share = 0.8"
  q -c "ALTER SYSTEM RESET ekm.rotation_target_app_share" >/dev/null; reload
  q -c "SELECT ekm_unregister_column('people', 'email'), ekm_unregister_column('people', 'ssn')" -c "DROP TABLE people" >/dev/null
fi

if [ $ONLY_TPS -eq 0 ]; then
echo
echo "== C. replica lag during a rotation of $ROWS rows x 2 columns (streaming standby)"
rm -rf "$sdir"; mkdir -p "$sdir"; [ "$(id -u)" -eq 0 ] && chown "$EKM_PG_USER" "$sdir"
as_pg "$PGBIN/pg_basebackup" -h "$dir" -p "$port" -U postgres -D "$sdir/data" -R -X stream -c fast >/dev/null 2>&1
as_pg sed -i -e "s/^port = .*/port = $sport/" -e "s|^unix_socket_directories = .*|unix_socket_directories = '$sdir'|" "$sdir/data/postgresql.conf"
echo "wal_receiver_status_interval = 1" | as_pg tee -a "$sdir/data/postgresql.conf" >/dev/null
cluster_restart_only "$sdir"
# values on the active key (those of part A's tables are on keys retired since)
q -c "CREATE TABLE t_lag AS SELECT id, ekm_encrypt('cust' || lpad(id::text, 9, '0') || '@example.com', 'e') AS email, ekm_encrypt('+91' || lpad(id::text, 10, '0'), 'm') AS mobno FROM generate_series(1, $ROWS) id" \
  -c "ALTER TABLE t_lag ADD PRIMARY KEY (id)" -c "VACUUM ANALYZE t_lag" >/dev/null
q -c "SELECT ekm_register_column('t_lag', 'email', 'e'), ekm_register_column('t_lag', 'mobno', 'm')" >/dev/null
lag_run() {
  local t0 max=0 l
  t0=$(now)
  q -c "SELECT DISTINCT job_id FROM ekm_rotate(force => true)" >/dev/null
  while [ "$(q -c "SELECT state FROM ekm.rotation_job ORDER BY job_id DESC LIMIT 1")" = running ]; do
    l=$(q -c "SELECT coalesce(round(max(extract(epoch FROM replay_lag)) * 1000), 0) FROM pg_stat_replication")
    [ "${l%.*}" -gt "$max" ] && max=${l%.*}
    sleep 0.1
  done
  printf '%-52s largest replay_lag %6s ms  rotation %6.1f s\n' "$1" "$max" "$(python3 -c "print($(now) - $t0)")"
}
lag_run "default settings"
q -c "ALTER SYSTEM SET ekm.rotation_max_replica_lag = 100" >/dev/null; reload
lag_run "rotation_max_replica_lag = 100 ms"
q -c "ALTER SYSTEM RESET ekm.rotation_max_replica_lag" >/dev/null; reload

cluster_stop "$sdir" immediate >/dev/null 2>&1 || true
q -c "SELECT ekm_unregister_column('t_lag', 'email'), ekm_unregister_column('t_lag', 'mobno')" >/dev/null

fi  # C
fi  # A-C
[ $ONLY_TPS -eq 1 ] && exit 0
echo
# workers_run TABLE CONTEXT_PREFIX: the table (loaded, vacuumed) rotated by
# the single-session floor, then by ekm with 1 and 2 workers; prints the
# times and ratios
workers_run() {
  local t=$1 p=$2 floor w t0
  local -A W
  q -c CHECKPOINT >/dev/null  # no run pays for the last one's writes
  t0=$(now)
  batches "$t" "email = email, mobno = mobno" 0 "$PART_ROWS" | q >/dev/null
  floor=$(python3 -c "print($(now) - $t0)")
  q -c "VACUUM FULL $t" >/dev/null
  q -c "SELECT ekm_register_column('$t', 'email', '${p}e'), ekm_register_column('$t', 'mobno', '${p}m')" >/dev/null
  for w in 1 2; do
    q -c "ALTER SYSTEM SET ekm.rotation_workers = $w" >/dev/null; reload
    q -c CHECKPOINT >/dev/null
    t0=$(now)
    q -c "SELECT DISTINCT job_id FROM ekm_rotate(force => true)" >/dev/null
    [ "$(wait_job)" = done ] || echo "ekm job failed"
    W[$w]=$(python3 -c "print($(now) - $t0)")
  done
  q -c "ALTER SYSTEM RESET ekm.rotation_workers" >/dev/null; reload
  # (a later section's rotations move only its own table)
  q -c "SELECT ekm_unregister_column('$t', 'email'), ekm_unregister_column('$t', 'mobno')" >/dev/null
  printf '%-44s %8.2f s\n' "floor, one session, no vacuum" "$floor"
  printf '%-44s %8.2f s  %5.2fx the floor\n' "ekm_rotate, 1 worker" "${W[1]}" "$(python3 -c "print(${W[1]} / $floor)")"
  printf '%-44s %8.2f s  %5.2fx the floor  %5.2fx faster than 1 worker\n' "ekm_rotate, 2 workers" "${W[2]}" \
    "$(python3 -c "print(${W[2]} / $floor)")" "$(python3 -c "print(${W[1]} / ${W[2]})")"
  echo "(this machine has $(nproc) cores)"
}

echo "== D. a partitioned table, $PART_ROWS rows x 2 columns in 4 partitions: 1 and 2 workers"
q <<SQL
CREATE TABLE parts (id int PRIMARY KEY, email text, mobno text) PARTITION BY HASH (id);
CREATE TABLE parts_0 PARTITION OF parts FOR VALUES WITH (MODULUS 4, REMAINDER 0);
CREATE TABLE parts_1 PARTITION OF parts FOR VALUES WITH (MODULUS 4, REMAINDER 1);
CREATE TABLE parts_2 PARTITION OF parts FOR VALUES WITH (MODULUS 4, REMAINDER 2);
CREATE TABLE parts_3 PARTITION OF parts FOR VALUES WITH (MODULUS 4, REMAINDER 3);
INSERT INTO parts SELECT g, ekm_encrypt('cust' || lpad(g::text, 9, '0') || '@example.com', 'pe'), ekm_encrypt('+91' || lpad(g::text, 10, '0'), 'pm')
FROM generate_series(1, $PART_ROWS) g;
VACUUM ANALYZE parts;
SQL
workers_run parts p

echo
echo "== E. one table, $PART_ROWS rows x 2 columns: 1 and 2 workers (block ranges of the one table)"
q <<SQL
CREATE TABLE one (id int PRIMARY KEY, email text, mobno text);
INSERT INTO one SELECT g, ekm_encrypt('cust' || lpad(g::text, 9, '0') || '@example.com', 'oe'), ekm_encrypt('+91' || lpad(g::text, 10, '0'), 'om')
FROM generate_series(1, $PART_ROWS) g;
VACUUM ANALYZE one;
SQL
workers_run one o
