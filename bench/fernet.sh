#!/usr/bin/env bash
# Adopting the runbook's Fernet data, measured in one run on one throwaway
# cluster (release build). The table is written by Python's cryptography
# package exactly as the runbook's EncryptionKeyManager wrote it
# (pgrx-tests/scripts/fernet_fixture.py), 2 columns per row.
#
#   read:    the runbook's Python loop (psycopg fetch, then MultiFernet
#            decrypt of each value, as its manager did) against
#            SELECT ekm_decrypt(...) in SQL: µs per row, and the ratio
#   migrate: ekm_rotate moving the Fernet values of both columns onto an ekm
#            key (one job), and ekm_encrypt_column on each column, against
#            ekm_rotate of the same rows already on an ekm key: seconds, ratio
#
#   bash bench/fernet.sh [--rows N] [--no-build]
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
if [ $BUILD -eq 1 ]; then
  bash scripts/setup.sh
  cargo pgrx install --release --pg-config /usr/bin/pg_config
fi
source scripts/lib.sh
dir=/tmp/ekm-bench-fernet; port=61452
trap 'cluster_stop "$dir" >/dev/null 2>&1 || true' EXIT
cluster_start "$dir" "$port" "max_parallel_workers_per_gather = 0" "shared_buffers = '512MB'" "jit = off" "fsync = on"
# each job in a database of its own (its own keys: a rotation in one does not
# retire a key another one's values are on)
q() { cpsql "$dir" "$port" -d "${DB:-bench}" -At -q "$@"; }
venv=$dir/venv
echo "installing Python's cryptography and psycopg in a virtualenv..."
python3 -m venv "$venv" && "$venv/bin/pip" install -q cryptography "psycopg[binary]"
echo "writing $ROWS rows the runbook's way..."
"$venv/bin/python" pgrx-tests/scripts/fernet_fixture.py "$ROWS" "$dir/fx"
for db in bench bench_enc bench_ekm; do
  cpsql "$dir" "$port" -d postgres -q -c "CREATE DATABASE $db"
  DB=$db q -c "CREATE EXTENSION ekm"
  DB=$db q -c "CREATE TABLE people (id int PRIMARY KEY, email text, mobno text, email_plain text, mobno_plain text)"
  DB=$db q -c "\\copy people FROM '$dir/fx/people.tsv'"
done
for db in bench bench_enc; do
  echo "SELECT count(*) FROM ekm_import_fernet_keys(:'keys'::jsonb)" | DB=$db q -v keys="$(cat "$dir/fx/keys.json")" >/dev/null
done
# the baseline: the same rows, on an ekm key
DB=bench_ekm q -c "UPDATE people SET email = ekm_encrypt(email_plain, 'public.people.email'), mobno = ekm_encrypt(mobno_plain, 'public.people.mobno')"
for db in bench bench_enc bench_ekm; do DB=$db q -c "VACUUM (FREEZE, ANALYZE)"; done
q -c "CHECKPOINT"

# read: the runbook's loop in Python
py_us=$("$venv/bin/python" - "$dir" "$port" "$dir/fx/keys.json" <<'PY'
import json, sys, time
import psycopg
from cryptography.fernet import Fernet, MultiFernet
d, port, keys = sys.argv[1], sys.argv[2], sys.argv[3]
ks = json.load(open(keys))
# the manager's MultiFernet: the current key first, then the older ones
mf = MultiFernet([Fernet(k["key"]) for k in sorted(ks, key=lambda k: k["created_at"], reverse=True)])
def decrypt(v):
    if v is None:
        return None
    if v.startswith("FERNET_V2:"):
        v = v.split(":", 2)[2]
    return mf.decrypt(v.encode()).decode()
best = None
for _ in range(3):
    t0 = time.perf_counter()
    n = 0
    with psycopg.connect(host=d, port=port, user="postgres", dbname="bench") as c:
        with c.cursor(name="runbook") as cur:  # a server-side cursor, as a Django iterator()
            cur.itersize = 2000
            cur.execute("SELECT id, email, mobno FROM people")
            for _id, email, mobno in cur:
                decrypt(email); decrypt(mobno)
                n += 1
    t = (time.perf_counter() - t0) / n * 1e6
    best = t if best is None else min(best, t)
print(f"{best:.3f}")
PY
)
sql_ms=() 
for _ in 1 2 3; do
  sql_ms+=("$(q -c "\\timing on" -c "SELECT count(ekm_decrypt(email)) + count(ekm_decrypt(mobno)) FROM people" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p')")
done
sql_best=$(printf '%s\n' "${sql_ms[@]}" | sort -n | head -n1)
sql_us=$(awk -v ms="$sql_best" -v n="$ROWS" 'BEGIN { printf "%.3f", ms * 1000 / n }')

# migrate
run_job() { # SQL that starts one job -> seconds until it is done
  local t0 t1 job
  t0=$(date +%s.%N)
  job=$(q -c "$1" | head -n1)
  q -c "SET client_min_messages = warning" -c "SELECT state FROM ekm_rotation_wait($job, 3600)" >/dev/null
  t1=$(date +%s.%N)
  [ "$(q -c "SELECT state FROM ekm.rotation_job WHERE job_id = $job")" = done ] || { echo "job $job did not finish" >&2; exit 1; }
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }'
}
register() { DB=$1 q -c "SELECT ekm_register_column('people', 'email', 'public.people.email')" -c "SELECT ekm_register_column('people', 'mobno', 'public.people.mobno')" >/dev/null; }
register bench
t_fernet=$(DB=bench run_job "SELECT job_id FROM ekm_rotate(batch_size => 1000, force => true) LIMIT 1")
q -c "CHECKPOINT"
t_enc_email=$(DB=bench_enc run_job "SELECT job_id FROM ekm_encrypt_column('people', 'email', 1000, false, 'public.people.email')")
t_enc_mobno=$(DB=bench_enc run_job "SELECT job_id FROM ekm_encrypt_column('people', 'mobno', 1000, false, 'public.people.mobno')")
t_enc=$(awk -v a="$t_enc_email" -v b="$t_enc_mobno" 'BEGIN { printf "%.2f", a + b }')
q -c "CHECKPOINT"
register bench_ekm
t_ekm=$(DB=bench_ekm run_job "SELECT job_id FROM ekm_rotate(batch_size => 1000, force => true) LIMIT 1")
# every migrated value is an ekm ciphertext and decrypts to its plaintext
ok=0
for db in bench bench_enc; do
  n=$(DB=$db q -c "SELECT count(*) FROM people WHERE (email IS NULL OR email LIKE 'ekm1:%') AND mobno LIKE 'ekm1:%'
                     AND ekm_decrypt(email, 'public.people.email') IS NOT DISTINCT FROM email_plain AND ekm_decrypt(mobno, 'public.people.mobno') = mobno_plain")
  ok=$((ok + n))
done

echo
echo "Fernet adoption benchmark: $ROWS rows x 2 columns (the runbook's format, written by Python's cryptography), one run; fsync = on"
echo "read, µs per row (2 values), best of 3:"
awk -v p="$py_us" -v s="$sql_us" 'BEGIN { printf "  runbook loop in Python (psycopg fetch + MultiFernet.decrypt)  %8.3f\n  SELECT ekm_decrypt(...) in SQL                                %8.3f\n  ekm is %.1fx faster per row\n", p, s, p / s }'
echo "migrate onto an ekm key, seconds to done:"
awk -v f="$t_fernet" -v e="$t_enc" -v k="$t_ekm" -v ee="$t_enc_email" -v em="$t_enc_mobno" 'BEGIN {
  printf "  ekm_rotate from Fernet (both columns, one job)           %7.2f  (%.2fx ekm rotation)\n", f, f / k
  printf "  ekm_encrypt_column from Fernet (email %.2f + mobno %.2f)  %7.2f  (%.2fx ekm rotation)\n", ee, em, e, e / k
  printf "  ekm_rotate of the same rows already on an ekm key         %7.2f\n", k }'
echo "values checked after the migrations: $ok of $((2 * ROWS)) rows decrypt to their plaintexts"
