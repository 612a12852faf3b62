#!/usr/bin/env bash
# Adopting the runbook's data with the real thing: Python's cryptography
# package (pip, in a virtualenv under the test's directory) writes a table
# exactly as the runbook's EncryptionKeyManager did (fernet_fixture.py:
# FERNET_V2:<key_id>:<token> under two keys, bare V1 tokens, NULLs, empty
# strings, non-ASCII). Then, in psql: import the keys from the key store's
# JSON, decrypt everything and compare with the plaintexts, migrate both
# columns onto ekm keys under concurrent writers, retire the imported keys
# with a rotation, and destroy them with cleanup after a scan. A second
# database holds values on a key the runbook lost: they are reported by row
# and keep the imported keys from retiring. ROWS (default 20000) sets the size.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib.sh"
source "$here/tap.sh"
source "$here/pause.sh"
dir=/tmp/ekm-fernet; port=61448
ROWS=${ROWS:-20000}
writer_pids=()
cleanup() {
  rm -f "$dir/writers.on"
  for p in "${writer_pids[@]}"; do kill "$p" 2>/dev/null; done
  cluster_stop "$dir" immediate >/dev/null 2>&1 || true
}
trap cleanup EXIT
cluster_start "$dir" "$port" "ekm.debug_pause_points = on" "ekm.rotation_retry_pause = 100" || exit 1
q() { local db=$1; shift; cpsql "$dir" "$port" -d "$db" -At -q -c "$1" 2>&1; }
qerr() { cpsql "$dir" "$port" -d "$1" -At -q -v VERBOSITY=verbose -c "$2" 2>&1 | grep -E '^ERROR' | head -n 1; }
wait_job() { cpsql "$dir" "$port" -d "$1" -At -q -c "SELECT state FROM ekm_rotation_wait($2, $3)" 2>/dev/null; }

# The real Fernet: cryptography from PyPI in a virtualenv of this test.
venv=$dir/venv
if python3 -m venv "$venv" >"$dir/venv.log" 2>&1 && "$venv/bin/pip" install -q cryptography >>"$dir/venv.log" 2>&1; then
  ok "Python's cryptography package installed ($("$venv/bin/python" -c 'import cryptography; print(cryptography.__version__)'))"
else
  tail -n 20 "$dir/venv.log"; not_ok "Python's cryptography package installed"; tap_done; exit 1
fi
fixture() { # db rows [--with-lost]
  "$venv/bin/python" "$here/fernet_fixture.py" "$2" "$dir/fx_$1" ${3:-} >/dev/null || return 1
  q postgres "CREATE DATABASE $1" >/dev/null
  q "$1" "CREATE EXTENSION ekm" >/dev/null
  q "$1" "CREATE TABLE people (id int PRIMARY KEY, email text, mobno text, email_plain text, mobno_plain text)" >/dev/null
  cpsql "$dir" "$port" -d "$1" -q -c "\\copy people FROM '$dir/fx_$1/people.tsv'" >/dev/null
}
fixture app "$ROWS" || { not_ok "the fixture is written"; tap_done; exit 1; }
check "the runbook's table is loaded" "$(q app "SELECT count(*) FROM people")" "$ROWS"
check_match "with FERNET_V2 values under two keys and bare tokens" \
  "$(q app "SELECT count(DISTINCT split_part(email, ':', 2)) FILTER (WHERE email LIKE 'FERNET_V2:%') || ':' || (count(*) FILTER (WHERE email LIKE 'gAAAAA%') > 0) FROM people")" '^2:true$'
keys_json=$(cat "$dir/fx_app/keys.json")
# two of the runbook's values, for a straggling writer in step 4
v_new=$(q app "SELECT email FROM people WHERE email LIKE 'FERNET_V2:key_20251226_abc123:%' ORDER BY id LIMIT 1")
v_bare=$(q app "SELECT email FROM people WHERE email LIKE 'gAAAAA%' ORDER BY id LIMIT 1")
# Copies outside the migrated columns (a history table nobody registers):
# 5 values on each key id and 5 bare tokens, and the same rows' mobile numbers
# inside JSON.
q app "CREATE TABLE people_history (id int PRIMARY KEY, email text, extra jsonb);
       INSERT INTO people_history SELECT id, email, jsonb_build_object('mobno', mobno) FROM
         (SELECT *, row_number() OVER (PARTITION BY CASE WHEN email LIKE 'gAAAAA%' THEN 'bare' ELSE split_part(email, ':', 2) END ORDER BY id) AS rn
          FROM people WHERE email LIKE 'FERNET_V2:%' OR email LIKE 'gAAAAA%') x WHERE rn <= 5" >/dev/null
check "an unregistered history table holds copies of 15 Fernet values" "$(q app "SELECT count(*) FROM people_history")" 15
key_texts=$("$venv/bin/python" -c 'import json,sys; print("\n".join(k["key"] for k in json.load(open(sys.argv[1]))))' "$dir/fx_app/keys.json")

# Before the import the values are another scheme's.
check_match "before the import Fernet values do not decrypt, with the fix" "$(qerr app "SELECT ekm_decrypt(email) FROM people WHERE id = 1")" \
  '^ERROR:  42704: Fernet key key_20250927_153045_b7c2 is not imported in this database'
check_match "an encryption dry run counts them as another scheme's" "$(q app "SELECT foreign_values FROM ekm_encrypt_column('people', 'email', dry_run => true)")" '^[1-9][0-9]+$'

# 1. Import the key store (the runbook's active key is imported as rotating:
#    ekm never encrypts with Fernet).
check "the key store's keys are imported in one call" \
  "$(echo "SELECT string_agg(action, ',' ORDER BY key_id) FROM ekm_import_fernet_keys(:'keys'::jsonb)" | cpsql "$dir" "$port" -d app -At -q -v keys="$keys_json" 2>&1)" \
  "imported Fernet key key_20250927_153045_b7c2 (rotating),imported Fernet key key_20251226_abc123 (rotating)"
check "both are rotating (decrypt only), never active" "$(q app "SELECT string_agg(key_id || ':' || rotation_status, ',' ORDER BY key_id) FROM ekm.keys WHERE kind = 'fernet'")" \
  "key_20250927_153045_b7c2:rotating,key_20251226_abc123:rotating"

# 2. Every value reads in SQL, as the application reads it.
check "every value decrypts to what the runbook encrypted" \
  "$(q app "SELECT count(*) FROM people WHERE ekm_decrypt(email) IS NOT DISTINCT FROM email_plain AND ekm_decrypt(mobno, 'public.people.mobno') IS NOT DISTINCT FROM mobno_plain")" "$ROWS"
check "ekm_key_id names the imported key of each value (bare tokens: the key that made them)" \
  "$(q app "SELECT count(*) FILTER (WHERE ekm_key_id(email) = 'key_20250927_153045_b7c2') > 0 AND count(*) FILTER (WHERE ekm_key_id(email) = 'key_20251226_abc123') > 0
              AND count(*) FILTER (WHERE email LIKE 'gAAAAA%' AND ekm_key_id(email) <> 'key_20250927_153045_b7c2') = 0 FROM people WHERE email IS NOT NULL")" t
check "ekm_is_encrypted is true for every Fernet value" "$(q app "SELECT count(*) FILTER (WHERE NOT ekm_is_encrypted(email)) FROM people WHERE email IS NOT NULL")" 0
check_match "the token's time is there for audits" "$(q app "SELECT ekm_fernet_token_time(email) > now() - interval '1 day' FROM people WHERE id = 1")" '^t$'
n_email=$(q app "SELECT count(email) FROM people")
check_match "the encryption dry run reports the Fernet values per key" \
  "$(q app "SELECT plaintext_values || ' | ' || note FROM ekm_encrypt_column('people', 'email', dry_run => true)")" \
  "^$n_email \| dry run: 0 plaintext values would be encrypted; $n_email Fernet values would move onto the active key \(key_20250927_153045_b7c2: [0-9]+, key_20251226_abc123: [0-9]+\)"

# 3. Migrate both columns onto the active ekm key, bound to their contexts,
#    while the new application writes ekm ciphertexts (and counts its commits).
q app "CREATE TABLE writer_tx (w int PRIMARY KEY, n bigint NOT NULL); INSERT INTO writer_tx VALUES (1, 0), (2, 0)" >/dev/null
committed() { q app "SELECT sum(n) FROM writer_tx"; }
writer() { # seed
  local i=0 sql id
  while [ -f "$dir/writers.on" ] && [ $i -lt 100000 ]; do
    sql=""
    for _ in 1 2 3 4 5; do
      id=$(( (RANDOM * 32768 + RANDOM) % ROWS + 1 ))
      sql+="UPDATE people SET email = ekm_encrypt('w$1-$i@example.com', 'public.people.email'), email_plain = 'w$1-$i@example.com' WHERE id = $id;"
      i=$((i + 1))
    done
    sql+="UPDATE writer_tx SET n = n + 1 WHERE w = $1;"
    printf 'BEGIN;%sCOMMIT;\n' "$sql"
  done | cpsql "$dir" "$port" -d app -q >/dev/null 2>"$dir/writer$1.err" 11>&- 12>&- 13>&- 14>&-
}
touch "$dir/writers.on"
for w in 1 2; do writer $w & writer_pids+=($!); done
for _ in $(seq 1 100); do [ "$(committed)" -gt 0 ] && break; sleep 0.1; done
pause_hold app pass_end
job=$(q app "SELECT job_id FROM ekm_encrypt_column('people', 'email', 500, false, 'public.people.email')")
tx0=$(committed)
check "the email migration ends its pass and waits" "$(paused_at app pass_end)" yes
tx1=$(committed)
check_match "the writers committed while it ran ($tx0 -> $tx1)" "$(q app "SELECT state FROM ekm.rotation_job WHERE job_id = $job"):$((tx1 - tx0))" '^running:[1-9][0-9]*$'
check_match "progress shows it" "$(q app "SELECT kind || ':' || column_name || ':' || (rows_done > 0) FROM ekm.rotation_progress WHERE job_id = $job")" '^encrypt:email:true$'
# cancelled there (the pass is over, the job not): every value still reads
check_match "it can be cancelled" "$(q app "SELECT ekm_rotation_cancel($job)")" "running -> cancelled"
pause_release
check "after the cancel every value reads, in either format" \
  "$(q app "SELECT count(*) FROM people WHERE ekm_decrypt(email, 'public.people.email') IS NOT DISTINCT FROM email_plain")" "$ROWS"
check_match "and resumed" "$(q app "SELECT ekm_rotation_resume($job)")" "cancelled -> running"
check "the email migration finishes" "$(wait_job app "$job" 600)" done
rm -f "$dir/writers.on"; for p in "${writer_pids[@]}"; do wait "$p"; done; writer_pids=()
check "the writers saw no errors (nor a failed connection)" "$(client_errors "$dir"/writer*.err)" 0
# The mobno migration's worker is killed at its first batch (the postmaster
# restarts every backend); the job resumes by itself.
pause_hold app batch
job=$(q app "SELECT job_id FROM ekm_encrypt_column('people', 'mobno', 500, false, 'public.people.mobno')")
check "the mobno migration waits at its first batch" "$(paused_at app batch)" yes
wpid=$(q app "SELECT pid FROM pg_stat_activity WHERE backend_type = 'ekm rotation' AND wait_event_type = 'Lock'")
check "its job is running" "$(q app "SELECT state FROM ekm.rotation_job WHERE job_id = $job")" running
r0=$(crash_restarts "$dir")
kill -KILL "$wpid"; check "the worker was sent SIGKILL" "$?" 0
wait_crash_restart "$dir" "$port" "$r0"
pause_release # (its session ended with the crash)
check "the server log shows the worker killed" "$(grep -c "(PID $wpid) was terminated by signal 9" "$dir/server.log")" 1
check "the mobno migration resumes by itself and finishes" "$(wait_job app "$job" 600)" done
check "every value is an ekm ciphertext on the active key (NULLs stay NULL)" \
  "$(q app "SELECT count(*) FILTER (WHERE email LIKE 'ekm1:%' AND ekm_key_id(email) = k.key_id) + count(*) FILTER (WHERE email IS NULL AND email_plain IS NULL) || ':' ||
                   count(*) FILTER (WHERE mobno LIKE 'ekm1:%' AND ekm_key_id(mobno) = k.key_id)
            FROM people, (SELECT key_id FROM ekm.keys WHERE is_active) k")" "$ROWS:$ROWS"
check "no write lost: every value decrypts, with its column's context, to the original or to what the writers wrote" \
  "$(q app "SELECT count(*) FROM people WHERE ekm_decrypt(email, 'public.people.email') IS NOT DISTINCT FROM email_plain AND ekm_decrypt(mobno, 'public.people.mobno') = mobno_plain")" "$ROWS"
check "the non-ASCII and empty values came through" \
  "$(q app "SELECT count(*) FILTER (WHERE ekm_decrypt(email, 'public.people.email') LIKE 'zoë%') > 0 AND count(*) FILTER (WHERE ekm_decrypt(mobno, 'public.people.mobno') = '') > 0 FROM people")" t
check "both columns are registered with their contexts" \
  "$(q app "SELECT string_agg(col || '=' || context, ',' ORDER BY col) FROM ekm.registered_column WHERE tbl = 'people'::regclass")" "email=public.people.email,mobno=public.people.mobno"

# 4. The imported keys retire through a rotation's check and fence; then,
#    after a scan, cleanup destroys them.
check "the imported keys are still rotating" "$(q app "SELECT count(*) FROM ekm.keys WHERE kind = 'fernet' AND rotation_status = 'rotating'")" 2
job=$(q app "SELECT job_id FROM ekm_rotate(force => true) LIMIT 1")
check "a rotation finishes" "$(wait_job app "$job" 600)" done
check "and retires the imported keys" "$(q app "SELECT string_agg(rotation_status, ',') FROM ekm.keys WHERE kind = 'fernet'")" "retired,retired"
scan=$(q app "SELECT job_id FROM ekm_scan_database()")
check "a scan of the database finishes" "$(wait_job app "$scan" 600)" done
# The copies in people_history: the scan finds them (FERNET_V2 values by the
# key they name; bare tokens, whose key no longer decrypts, unattributed),
# health warns, and cleanup keeps the imported keys: destroying them would
# lose the copies.
check "the scan finds the Fernet copies in the unregistered table, by key" \
  "$(q app "SELECT string_agg(key_id || '=' || values, ',' ORDER BY key_id) FROM ekm.ciphertext_locations WHERE table_name = 'people_history'::regclass AND column_name = 'email'")" \
  "fernet:unknown-key=5,key_20250927_153045_b7c2=5,key_20251226_abc123=5"
check_match "and the ones inside JSON" \
  "$(q app "SELECT sum(values) FROM ekm.ciphertext_locations WHERE table_name = 'people_history'::regclass AND column_name = 'extra'")" '^(1[0-5]|[1-9])$'
check_match "health warns about them" "$(q app "SELECT status || ': ' || detail FROM ekm_health() WHERE \"check\" = 'unregistered_ciphertexts'")" \
  '^warning: .*people_history\.email: 15 values'
check_match "cleanup keeps both imported keys, saying where their values are" \
  "$(q app "SELECT string_agg(key_id || ' ' || action, ' | ' ORDER BY key_id) FROM ekm_cleanup_old_keys(0) WHERE key_id IN (SELECT key_id FROM ekm.keys WHERE kind = 'fernet')")" \
  '^key_20250927_153045_b7c2 kept: the scan of the database finished .* found values on it in (public\.)?people_history\.email: 5.* \| key_20251226_abc123 kept: .*people_history\.email: 5'
check "their material is kept" "$(q app "SELECT count(*) FROM ekm.key_material JOIN ekm.key USING (key_id) WHERE kind = 'fernet' AND wrapped IS NOT NULL")" 2
# with only bare tokens left, the unattributed ones still keep them
q app "DELETE FROM people_history WHERE email LIKE 'FERNET_V2:%'; UPDATE people_history SET extra = NULL" >/dev/null
scan=$(q app "SELECT job_id FROM ekm_scan_database()")
check "a second scan finishes" "$(wait_job app "$scan" 600)" done
check_match "cleanup keeps them for the bare tokens it cannot attribute" \
  "$(q app "SELECT string_agg(key_id || ' ' || action, ' | ' ORDER BY key_id) FROM ekm_cleanup_old_keys(0) WHERE key_id IN (SELECT key_id FROM ekm.keys WHERE kind = 'fernet')")" \
  '^key_20250927_153045_b7c2 kept: .*bare Fernet tokens .*people_history\.email: 5.* \| key_20251226_abc123 kept: .*bare Fernet tokens'
q app "DROP TABLE people_history" >/dev/null
scan=$(q app "SELECT job_id FROM ekm_scan_database()")
check "once the copies are gone, a scan finishes" "$(wait_job app "$scan" 600)" done
# A straggling writer of the old code puts a FERNET_V2 value and a bare token
# back into the registered column after that scan: cleanup counts the
# registered columns in its own transaction and keeps the keys, even with
# force => true (which only overrides the scan guard).
s1=$(q app "SELECT min(id) FROM people"); s2=$(q app "SELECT min(id) + 1 FROM people")
q app "UPDATE people SET email = '$v_new' WHERE id = $s1; UPDATE people SET email = '$v_bare' WHERE id = $s2" >/dev/null
check "cleanup keeps the imported keys for values in a registered column, even forced" \
  "$(q app "SET client_min_messages = error; SELECT string_agg(key_id || ' ' || action, ' | ' ORDER BY key_id) FROM ekm_cleanup_old_keys(0, force => true) WHERE key_id IN (SELECT key_id FROM ekm.keys WHERE kind = 'fernet')")" \
  "key_20250927_153045_b7c2 kept: 1 values in registered columns still use it | key_20251226_abc123 kept: 2 values in registered columns still use it"
q app "UPDATE people SET email = ekm_encrypt(email_plain, 'public.people.email') WHERE id IN ($s1, $s2)" >/dev/null
check "cleanup destroys the imported keys" \
  "$(q app "SELECT string_agg(key_id || ':' || action, ',' ORDER BY key_id) FROM ekm_cleanup_old_keys(0) WHERE key_id IN (SELECT key_id FROM ekm.keys WHERE kind = 'fernet')")" \
  "key_20250927_153045_b7c2:destroyed,key_20251226_abc123:destroyed"
check "their material is gone" "$(q app "SELECT count(*) FROM ekm.key_material JOIN ekm.key USING (key_id) WHERE kind = 'fernet' AND wrapped IS NOT NULL")" 0
check "every value still decrypts" \
  "$(q app "SELECT count(*) FROM people WHERE ekm_decrypt(email, 'public.people.email') IS NOT DISTINCT FROM email_plain AND ekm_decrypt(mobno, 'public.people.mobno') = mobno_plain")" "$ROWS"
check_match "the imports and the retirement are audited" \
  "$(q app "SELECT string_agg(DISTINCT event, ',' ORDER BY event) FROM ekm.audit_log WHERE key_id LIKE 'key_2025%'")" 'fernet_key_imported.*key_destroyed.*key_retired'

# 5. Values on a key the runbook lost: no imported key decrypts them. The
#    dry run says so, the rotation moves every other value, lists those by
#    row, and keeps the imported keys rotating (needs_attention).
fixture lost 200 --with-lost || not_ok "the second fixture is written"
echo "SELECT count(*) FROM ekm_import_fernet_keys(:'keys'::jsonb)" | cpsql "$dir" "$port" -d lost -At -q -v keys="$(cat "$dir/fx_lost/keys.json")" >/dev/null
q lost "SELECT ekm_register_column('people', 'email'); SELECT ekm_register_column('people', 'mobno')" >/dev/null
n_lost=$(grep -c 'FERNET_V2:key_lost:' "$dir/fx_lost/people.tsv")
check_match "the rotation's dry run reports them" "$(q lost "SELECT values_on_unusable_keys || ' | ' || note FROM ekm_rotate(dry_run => true) WHERE column_name = 'mobno'")" \
  "^$n_lost \| .*$n_lost Fernet values no imported key decrypts"
check "health reports them as values that cannot be decrypted" "$(q lost "SELECT detail LIKE '%$n_lost Fernet values no imported key decrypts%' FROM ekm_health() WHERE \"check\" = 'unusable_values'")" t
job=$(q lost "SELECT job_id FROM ekm_rotate(force => true) LIMIT 1")
check "the rotation needs attention" "$(wait_job lost "$job" 600)" needs_attention
check "every other value moved onto the new key" \
  "$(q lost "SELECT count(*) FROM people WHERE (email IS NULL OR ekm_decrypt(email) = email_plain) AND (mobno LIKE 'FERNET_V2:key_lost:%' OR (mobno LIKE 'ekm1:%' AND ekm_decrypt(mobno) = mobno_plain))")" 200
check "the lost values are listed by primary key, left untouched" \
  "$(q lost "SELECT count(*) || ':' || bool_and(row_ref LIKE '(id)=(%' AND key_id = 'key_lost' AND reason LIKE '%key_lost, which is not imported%') FROM ekm.rotation_problem WHERE job_id = $job")" "$n_lost:true"
check "and the imported keys stay rotating" "$(q lost "SELECT string_agg(rotation_status, ',') FROM ekm.keys WHERE kind = 'fernet'")" "rotating,rotating"

# 6. A key imported (retired) by a transaction still open when a scan of the
#    database starts: key changes and scan starts are serialized, so the
#    scan waits, finds the values (in a table no one registered) and cleanup
#    keeps the key.
fixture late 40 || not_ok "the third fixture is written"
late_keys=$("$venv/bin/python" -c 'import json,sys; print(" ".join(k["key_id"] + "=" + k["key"] for k in json.load(open(sys.argv[1]))))' "$dir/fx_late/keys.json")
imports=""
for kv in $late_keys; do imports="$imports SELECT ekm_import_fernet_key('${kv%%=*}', '${kv#*=}', state => 'retired');"; done
# (under log_statement = all: the import statements hold keys; the log
# check at the end covers these keys too)
q postgres "ALTER SYSTEM SET log_statement = 'all'" >/dev/null; q postgres "SELECT pg_reload_conf()" >/dev/null; sleep 0.5
session_start 11 importer late
session_send 11 "SET client_min_messages = warning; BEGIN; $imports SELECT 'imported';"
session_line importer '^imported$' >/dev/null
cpsql "$dir" "$port" -d late -At -q -c "SELECT job_id FROM ekm_scan_database()" >"$dir/late_scan.out" 2>&1 11>&- 12>&- 13>&- 14>&- &
scan_pid=$!
scan_waits() { q late "SELECT count(*) FROM pg_locks WHERE locktype = 'userlock' AND classid = 6646637 AND objid = 0 AND objsubid = 1 AND NOT granted"; }
for _ in $(seq 1 200); do [ "$(scan_waits)" = 1 ] && break; sleep 0.05; done
check "the scan waits for the importing transaction" "$(scan_waits)" 1
session_send 11 "COMMIT; SELECT 'committed';"
session_line importer '^committed$' >/dev/null
session_end 11 importer
wait "$scan_pid"
scan=$(cat "$dir/late_scan.out")
q postgres "ALTER SYSTEM RESET log_statement" >/dev/null; q postgres "SELECT pg_reload_conf()" >/dev/null
check_match "the importing statement was logged, its text redacted" "$(grep -c 'LOG:  statement: (redacted by ekm)' "$dir/server.log")" '^[1-9]'
check "then the scan finishes" "$(wait_job late "$scan" 600)" done
check_match "it found the values on the imported keys" \
  "$(q late "SELECT string_agg(DISTINCT key_id, ',' ORDER BY key_id) FROM ekm.ciphertext_locations WHERE table_name = 'people'::regclass")" \
  '^(fernet:unknown-key,)?key_20250927_153045_b7c2,key_20251226_abc123$'
check_match "and cleanup keeps both keys" \
  "$(q late "SELECT string_agg(key_id || ' ' || action, ' | ' ORDER BY key_id) FROM ekm_cleanup_old_keys(0)")" \
  '^key_20250927_153045_b7c2 kept: the scan of the database .* \| key_20251226_abc123 kept: the scan of the database '

# The key material never reached the server log.
for k in $key_texts $(for kv in $late_keys; do echo "${kv#*=}"; done); do
  check "the server log never holds imported key ${k:0:6}…" "$(grep -c -- "$k" "$dir/server.log")" 0
done
# the crash of step 3 (the worker killed, the others ended, the
# reinitialization): nothing else crashed
check_log_clean "$dir/server.log" 3
tap_done
