#!/usr/bin/env bash
# Golden-file SQL regression tests (pg_regress) and multi-session isolation
# tests (pg_isolation_regress) against a throwaway cluster with ekm installed.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/../scripts/lib.sh"
dir=${EKM_REGRESS_DIR:-/tmp/ekm-regress}
port=${EKM_REGRESS_PORT:-61433}
PGXS=$("$EKM_PG_CONFIG" --pkglibdir)/pgxs/src/test
trap 'cluster_stop "$dir" immediate || true' EXIT
# pause points for the race specs; prepared transactions for the fence's
cluster_start "$dir" "$port" "ekm.debug_pause_points = on" "max_prepared_transactions = 5" "ekm.rotation_retry_pause = 50"
out=$dir/out
mkdir -p "$out"
[ "$(id -u)" -eq 0 ] && chown -R "$EKM_PG_USER" "$dir"
for db in ekm_regress ekm_isolation; do
  cpsql "$dir" "$port" -d postgres -q -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
done
tests=$(cd "$here/sql" && ls *.sql | sed 's/\.sql$//' | tr '\n' ' ')
rc=0
as_pg "$PGXS/regress/pg_regress" --bindir="$PGBIN" --use-existing --host="$dir" --port="$port" --user=postgres \
  --inputdir="$here" --outputdir="$out" --dbname=ekm_regress $tests || rc=1
[ $rc -eq 0 ] || { cat "$out/regression.diffs" 2>/dev/null | head -n 200; }
specs=$(cd "$here/specs" && ls *.spec 2>/dev/null | sed 's/\.spec$//' | tr '\n' ' ')
if [ -n "$specs" ]; then
  as_pg "$PGXS/isolation/pg_isolation_regress" --bindir="$PGBIN" --use-existing --host="$dir" --port="$port" --user=postgres \
    --inputdir="$here" --outputdir="$out/isolation" --dbname=ekm_isolation $specs || {
      rc=1; cat "$out/isolation/regression.diffs" 2>/dev/null | head -n 200; }
fi
# the server log of the whole run: no crash (a process terminated by a
# signal, a PANIC, a crash restart), reported as a test of its own
crashes=$(grep -cE 'terminated by signal|was terminated by|PANIC|terminating any other active server processes|all server processes terminated; reinitializing' "$dir/server.log" || true)
if [ "$crashes" -eq 0 ]; then
  echo "test server_log_no_crash        ... ok"
else
  echo "test server_log_no_crash        ... FAILED ($crashes crash lines in $dir/server.log)"
  grep -E 'terminated by signal|PANIC' "$dir/server.log" | head -n 5
  rc=1
fi
exit $rc
