#!/usr/bin/env bash
# ekm on PostgreSQL 15 and 18 in one run: for each version, a release build
# of ekm for it, a throwaway cluster, 200,000 rows with two encrypted
# columns, then
#   decrypt: µs/row of SELECT count(ekm_decrypt(...)) over both columns
#            against a plain scan (count(length(...)) of the same columns),
#            best of 3;
#   rotate:  ekm_rotate to done against the floor (batches of 1,000 rows of
#            UPDATE t SET c = c, committed one by one), on identical tables.
# Prints one line per version and the ratios.
#
#   bash bench/versions.sh [--rows N] [--no-build]
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=200000; BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --rows) ROWS=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    *) echo "usage: $0 [--rows N] [--no-build]" >&2; exit 2 ;;
  esac
done
export PATH="$HOME/.cargo/bin:$PATH"
[ $BUILD -eq 1 ] && bash scripts/setup.sh
now() { date +%s.%N; }
results=()
for v in 15 18; do
  export EKM_PG=$v
  unset PGBIN
  source scripts/lib.sh
  if [ $BUILD -eq 1 ]; then
    ekm_install --release >/dev/null
  fi
  dir=/tmp/ekm-vbench-$v; port=$((61460 + v))
  cluster_start "$dir" "$port" "max_parallel_workers_per_gather = 0" "shared_buffers = '512MB'" "jit = off" \
    "autovacuum = off" "fsync = on" || exit 1
  q() { cpsql "$dir" "$port" -d postgres -At -q "$@"; }
  q <<SQL
CREATE EXTENSION ekm;
CREATE TABLE t (id int PRIMARY KEY, email text, mobno text);
INSERT INTO t SELECT g, ekm_encrypt('cust' || lpad(g::text, 9, '0') || '@example.com', 'e'), ekm_encrypt('+91' || lpad(g::text, 10, '0'), 'm')
FROM generate_series(1, $ROWS) g;
CREATE TABLE t_floor (LIKE t INCLUDING ALL);
INSERT INTO t_floor SELECT * FROM t;
VACUUM ANALYZE;
CREATE PROCEDURE batched(n int) LANGUAGE plpgsql AS \$\$
DECLARE lo int := 1;
BEGIN
    WHILE lo <= n LOOP
        UPDATE t_floor SET email = email, mobno = mobno WHERE id >= lo AND id < lo + 1000;
        COMMIT;
        lo := lo + 1000;
    END LOOP;
END \$\$;
SQL
  best() {  # SQL -> best of 3, seconds
    local b=999999 i t0 t
    for i in 1 2 3; do
      t0=$(now); q -c "$1" >/dev/null; t=$(python3 -c "print($(now) - $t0)")
      b=$(python3 -c "print(min($b, $t))")
    done
    echo "$b"
  }
  q -c "SELECT count(ekm_decrypt(email, 'e')) FROM t" >/dev/null  # keys loaded, table cached
  dec=$(best "SELECT count(ekm_decrypt(email, 'e')) + count(ekm_decrypt(mobno, 'm')) FROM t")
  plain=$(best "SELECT count(length(email)) + count(length(mobno)) FROM t")
  t0=$(now); q -c "CALL batched($ROWS)"; floor=$(python3 -c "print($(now) - $t0)")
  q -c "SELECT ekm_register_column('t', 'email', 'e'), ekm_register_column('t', 'mobno', 'm')" >/dev/null
  t0=$(now)
  job=$(q -c "SELECT DISTINCT job_id FROM ekm_rotate(force => true)")
  state=$(q -c "SELECT state FROM ekm_rotation_wait($job, 3600)" 2>/dev/null)
  rot=$(python3 -c "print($(now) - $t0)")
  server=$(q -c "SHOW server_version")
  cluster_stop "$dir" >/dev/null
  results+=("$(python3 -c "
r, dec, plain, floor, rot = $ROWS, $dec, $plain, $floor, $rot
print(f'PostgreSQL {\"$server\":<6} decrypt {dec / (2 * r) * 1e6:6.3f} us/value, plain scan {plain / (2 * r) * 1e6:6.3f} ({dec / plain:4.2f}x)   ekm_rotate {rot:5.2f} s ($state), floor {floor:5.2f} s ({rot / floor:4.2f}x)')
")")
done
printf '%s\n' "${results[@]}"
