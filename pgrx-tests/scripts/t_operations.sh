#!/usr/bin/env bash
# The runbook's operations against a real cluster: plaintext migration
# (ekm_encrypt_column) under concurrent writers, rollback after a completed
# rotation and in the middle of one, cleanup of old keys, health checks with
# each simulated failure, keys needing rotation, and automatic rotation.
# ROWS (default 100000) sets the size of the migrated table.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib.sh"
source "$here/tap.sh"
source "$here/pause.sh"
dir=/tmp/ekm-operations; port=61441
ROWS=${ROWS:-100000}
CTX=public.people.email
writer_pids=()
cleanup() {
  rm -f "$dir/writers.on"
  for p in "${writer_pids[@]}"; do kill "$p" 2>/dev/null; done
  cluster_stop "$dir" immediate >/dev/null 2>&1 || true
}
trap cleanup EXIT
# A master key file, as in production (the development default is a health warning).
mkdir_mk=/tmp/ekm-operations-mk; rm -rf "$mkdir_mk"; mkdir -p "$mkdir_mk"
MK=$mkdir_mk/master.key
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$MK"; chmod 600 "$MK"
[ "$(id -u)" -eq 0 ] && chown -R "$EKM_PG_USER" "$mkdir_mk"
cluster_start "$dir" "$port" "ekm.rotation_retry_pause = 200" "ekm.auto_rotate_naptime = 1" "ekm.master_key_file = '$MK'" "ekm.debug_pause_points = on" || exit 1
q() { local db=$1; shift; cpsql "$dir" "$port" -d "$db" -At -q -c "$1" 2>&1; }
qerr() { cpsql "$dir" "$port" -d "$1" -At -q -v VERBOSITY=verbose -c "$2" 2>&1 | grep -E '^ERROR' | head -n 1 | sed -E 's/key_[0-9]{8}_[0-9]{6}_[0-9a-f]{4}/key_X/g'; }
wait_job() { cpsql "$dir" "$port" -d "$1" -At -q -c "SELECT state FROM ekm_rotation_wait($2, $3)" 2>/dev/null; }
setconf() { q postgres "ALTER SYSTEM SET $1 = '$2'" >/dev/null; q postgres "SELECT pg_reload_conf()" >/dev/null; sleep 0.5; }
resetconf() { q postgres "ALTER SYSTEM RESET $1" >/dev/null; q postgres "SELECT pg_reload_conf()" >/dev/null; sleep 0.5; }
health() { q app "SELECT status FROM ekm_health() WHERE \"check\" = '$1'"; }
health_detail() { q app "SELECT detail FROM ekm_health() WHERE \"check\" = '$1'"; }
active() { q app "SELECT key_id FROM ekm.keys WHERE is_active"; }
state_of() { q app "SELECT rotation_status FROM ekm.keys WHERE key_id = '$1'"; }
jobs() { q app "SELECT count(*) FROM ekm.rotation_job"; }
total() { q app "SELECT count(*) FROM people"; }
# every row holds what the application last wrote (the shadow); row 101 keeps its foreign value
consistent() {
  q app "SELECT count(*) FROM people WHERE CASE WHEN id = 101 THEN email = '$FERNET'
         ELSE ekm_decrypt(email, '$CTX') IS NOT DISTINCT FROM email_shadow END"
}
on_key() { q app "SELECT count(*) FILTER (WHERE CASE WHEN ekm_is_encrypted(email) THEN ekm_key_id(email) = '$1' END) FROM people"; }
plaintext_left() { q app "SELECT count(*) FROM people WHERE ekm._ekm_is_plaintext(email)"; }

q postgres "CREATE DATABASE app" >/dev/null
q app "CREATE EXTENSION ekm" >/dev/null

# 1. Plaintext migration (the runbook's migrate_secure_encryption).
q app "CREATE TABLE people (id int PRIMARY KEY, email text, email_shadow text, age int)" >/dev/null
q app "INSERT INTO people SELECT g, 'user' || g || '@example.com', 'user' || g || '@example.com', g % 90
       FROM generate_series(1, $ROWS) g" >/dev/null
q app "UPDATE people SET email = ekm_encrypt(email_shadow, '$CTX') WHERE id <= 100" >/dev/null
FERNET="FERNET_V2:key_20250927_153045_b7c2:gAAAAA$(printf 'B%.0s' $(seq 94))"
q app "UPDATE people SET email = '$FERNET', email_shadow = NULL WHERE id = 101" >/dev/null
q app "UPDATE people SET email = NULL, email_shadow = NULL WHERE id BETWEEN 102 AND 106" >/dev/null
q app "VACUUM ANALYZE people" >/dev/null
K1=$(active)
snapshot() { q app "SELECT md5(string_agg(coalesce(email, '~'), ',' ORDER BY id)) || (SELECT count(*) FROM ekm.registered_column) || (SELECT count(*) FROM ekm.rotation_job) FROM people"; }
before=$(snapshot)
check "dry run counts plaintext, encrypted, foreign and NULL values" \
  "$(q app "SELECT plaintext_values || ':' || encrypted_values || ':' || foreign_values || ':' || null_values FROM ekm_encrypt_column('people', 'email', 1000, true)")" \
  "$((ROWS - 106)):100:1:5"
check "the dry run changes nothing (values, registrations, jobs)" "$(snapshot)" "$before"
check_match "a missing column is refused" "$(qerr app "SELECT * FROM ekm_encrypt_column('people', 'nope', 1000, false)")" '^ERROR:  42703: column "nope" of people does not exist'
check_match "a non-text column is refused" "$(qerr app "SELECT * FROM ekm_encrypt_column('people', 'age', 1000, false)")" '^ERROR:  42804: column "age" of people is integer'
check_match "batch_size below 1 is refused" "$(qerr app "SELECT * FROM ekm_encrypt_column('people', 'email', 0, false)")" '^ERROR:  22023: batch_size must be at least 1'
q app "CREATE ROLE ops_admin LOGIN; GRANT ekm_admin TO ops_admin; GRANT SELECT ON people TO ops_admin" >/dev/null
check_match "an admin without UPDATE on the column is refused" \
  "$(qerr app "SET ROLE ops_admin; SELECT * FROM ekm_encrypt_column('people', 'email', 1000, false)")" \
  '^ERROR:  42501: permission denied to register column "email" of people'
check_match "a role without ekm_admin cannot call it" \
  "$(qerr app "CREATE ROLE ops_plain; SET ROLE ops_plain; SELECT * FROM ekm_encrypt_column('people', 'email', 1000, true)")" \
  '^ERROR:  42501: permission denied for function ekm_encrypt_column'
pre_encrypted=$(q app "SELECT md5(string_agg(email, ',' ORDER BY id)) FROM people WHERE id <= 100")

# Writers during the migration: the old application writes plaintext, the
# new one ciphertext, both with the shadow in the same transaction. They
# leave rows 1..1000 alone (already-encrypted values must stay untouched).
writer() { # seed mode phase; mode: mixed (plaintext and ciphertext) or cipher
  local i=0 sql id plain
  while [ -f "$dir/writers.on" ] && [ $i -lt 100000 ]; do
    sql=""
    for _ in 1 2 3 4 5; do
      id=$(( (RANDOM * 32768 + RANDOM) % (ROWS - 1000) + 1001 ))
      plain="'p$1-$i@example.com'"
      [ "$2" = cipher ] && plain="ekm_encrypt('p$1-$i@example.com', '$CTX')"
      sql+="UPDATE people SET email = $plain, email_shadow = 'p$1-$i@example.com' WHERE id = $id;"
      id=$(( (RANDOM * 32768 + RANDOM) % (ROWS - 1000) + 1001 ))
      sql+="UPDATE people SET email = ekm_encrypt('c$1-$i@example.com', '$CTX'), email_shadow = 'c$1-$i@example.com' WHERE id = $id;"
      i=$((i + 1))
    done
    plain="'n$1-$i@example.com'"
    [ "$2" = cipher ] && plain="ekm_encrypt('n$1-$i@example.com', '$CTX')"
    sql+="INSERT INTO people VALUES ($ROWS + $1 * 1000000 + $3 * 200000 + $i, $plain, 'n$1-$i@example.com', 1);"
    sql+="DELETE FROM people WHERE id = $(( (RANDOM * 32768 + RANDOM) % (ROWS - 1000) + 1001 ));"
    sql+="UPDATE writer_tx SET n = n + 1 WHERE w = $1;"
    printf 'BEGIN;%sCOMMIT;\n' "$sql"
  done | cpsql "$dir" "$port" -d app -q >/dev/null 2>"$dir/writer$1.err" 11>&- 12>&- 13>&- 14>&-
}
# each writer counts its committed transactions, in the same transaction
committed() { q app "SELECT sum(n) FROM writer_tx"; }
phase=0
start_writers() {
  phase=$((phase + 1)); touch "$dir/writers.on"
  q app "DROP TABLE IF EXISTS writer_tx; CREATE TABLE writer_tx (w int PRIMARY KEY, n bigint NOT NULL); INSERT INTO writer_tx VALUES (1, 0), (2, 0), (3, 0)" >/dev/null
  for w in 1 2 3; do writer $w "$1" "$phase" & writer_pids+=($!); done
  for _ in $(seq 1 100); do [ "$(committed)" -gt 0 ] && break; sleep 0.1; done
}
# writers_overlap JOB POINT: with the worker held at POINT (the end of a
# pass, or its first check; the job still running), the writers committed
# transactions since $tx0 (read when the job had started).
writers_overlap() {
  check "the worker reaches $2 and waits there" "$(paused_at app "$2")" yes
  local tx1; tx1=$(committed)
  check_match "the writers committed transactions while the job's passes ran ($tx0 -> $tx1)" \
    "$(q app "SELECT state FROM ekm.rotation_job WHERE job_id = $1"):$((tx1 - tx0))" '^running:[1-9][0-9]*$'
}
stop_writers() { rm -f "$dir/writers.on"; for p in "${writer_pids[@]}"; do wait "$p"; done; writer_pids=(); }

start_writers mixed
pause_hold app pass_end  # (a migration retires no key: it has no check)
job=$(q app "SELECT job_id FROM ekm_encrypt_column('people', 'email', 500, false, '$CTX')")
tx0=$(committed)
check_match "ekm_encrypt_column returns a job id at once" "$job" '^[0-9]+$'
check_match "a rotation is refused while the migration runs" "$(qerr app "SELECT * FROM ekm_rotate(force => true)")" "^ERROR:  55006: rotation job $job is already running"
check_match "progress shows the migration" "$(q app "SELECT kind || ':' || table_name || '.' || column_name FROM ekm.rotation_progress WHERE job_id = $job")" '^encrypt:people.email$'
writers_overlap "$job" pass_end
pause_release
stop_writers
state=$(wait_job app "$job" 600)
check "the migration under concurrent writers finishes" "$state" done
check "writers saw no errors (nor a failed connection)" "$(client_errors "$dir"/writer*.err)" 0
# plaintext the old application writes after the migration's last sweep (as
# the writers may have, and this one surely does): a second run takes it
q app "INSERT INTO people VALUES (2000000000, 'late@example.com', 'late@example.com', 1)" >/dev/null
late=$(plaintext_left)
check_match "plaintext was written after the migration ($late values)" "$late" '^[1-9][0-9]*$'
job2=$(q app "SELECT job_id FROM ekm_encrypt_column('people', 'email', 500, false)")
check "a second run (for late plaintext writes) finishes, having moved exactly those" "$(wait_job app "$job2" 300):$(q app "SELECT rows_done FROM ekm.rotation_job WHERE job_id = $job2")" "done:$late"
check "no plaintext is left" "$(plaintext_left)" 0
check "no write lost: every row holds what the application last wrote" "$(consistent)" "$(total)"
check "values encrypted before the migration are untouched" "$(q app "SELECT md5(string_agg(email, ',' ORDER BY id)) FROM people WHERE id <= 100")" "$pre_encrypted"
check "the foreign (Fernet) value is left as it was" "$(q app "SELECT email = '$FERNET' FROM people WHERE id = 101")" t
check "NULLs stay NULL" "$(q app "SELECT count(*) FROM people WHERE id BETWEEN 102 AND 106 AND email IS NULL")" 5
check "the column is registered with its context" "$(q app "SELECT context FROM ekm.registered_column WHERE tbl = 'people'::regclass AND col = 'email'")" "$CTX"
check "the migration changed no key" "$(active)" "$K1"
check_match "migration start and end are audited" "$(q app "SELECT string_agg(event, ',' ORDER BY id) FROM ekm.audit_log WHERE detail->>'job_id' = '$job'")" '^column_encryption_started,column_encrypted$'

# Cancel and resume a migration.
q app "CREATE TABLE notes (id int PRIMARY KEY, body text)" >/dev/null
q app "INSERT INTO notes SELECT g, 'note ' || g FROM generate_series(1, 20000) g" >/dev/null
q app "ANALYZE notes" >/dev/null
setconf ekm.rotation_batch_pause 20
job=$(q app "SELECT job_id FROM ekm_encrypt_column('notes', 'body', 100, false)")
for _ in $(seq 1 100); do [ "$(q app "SELECT rows_done > 0 FROM ekm.rotation_job WHERE job_id = $job")" = t ] && break; sleep 0.1; done
check_match "a migration can be cancelled" "$(q app "SELECT ekm_rotation_cancel($job)")" "running -> cancelled"
sleep 0.5
check_match "after cancel part of the column is encrypted, the rest is plaintext" \
  "$(q app "SELECT count(*) FILTER (WHERE ekm_is_encrypted(body)) || ':' || count(*) FILTER (WHERE NOT ekm_is_encrypted(body)) FROM notes")" '^[1-9][0-9]*:[1-9][0-9]*$'
resetconf ekm.rotation_batch_pause
check_match "and resumed" "$(q app "SELECT ekm_rotation_resume($job)")" "cancelled -> running"
check "the resumed migration finishes" "$(wait_job app "$job" 300)" done
check "every note is encrypted and decrypts" "$(q app "SELECT count(*) FROM notes WHERE ekm_decrypt(body) = 'note ' || id")" 20000
q app "SELECT ekm_unregister_column('notes', 'body'); DROP TABLE notes" >/dev/null   # (left encrypted and unregistered, its values would be stranded by later rotations)

# 2. Rollback.
check_match "rollback is refused with no previous key" "$(qerr app "SELECT * FROM ekm_rollback()")" '^ERROR:  55000: there is no previous key to roll back to: key_X is the only key that was ever active'
q app "CREATE TABLE legacy (v text)" >/dev/null
job=$(q app "SELECT job_id FROM ekm_rotate(force => true) LIMIT 1")
check "rotation K1 -> K2 finishes" "$(wait_job app "$job" 300)" done
K2=$(active)
q app "INSERT INTO legacy VALUES (ekm_encrypt('legacy on K2'))" >/dev/null   # not registered: stays on K2
rb=$(q app "SELECT job_id || ':' || from_key || ':' || to_key FROM ekm_rollback()")
check "rollback after a completed rotation: from the new key to the previous one" "${rb#*:}" "$K2:$K1"
check "rollback: the previous key is active at once" "$(active)" "$K1"
check "and no longer shows when it was rotated or retired" "$(q app "SELECT rotated_at IS NULL AND retired_at IS NULL FROM ekm.keys WHERE key_id = '$K1'")" t
check "the rollback job finishes" "$(wait_job app "${rb%%:*}" 300)" done
check "after rollback every value is on the previous key" "$(on_key "$K1")" "$(( $(total) - 6 ))"
check "after rollback every row decrypts to what was written" "$(consistent)" "$(total)"
check "the rolled-back key is retired" "$(state_of "$K2")" retired
check_match "rollback is audited" "$(q app "SELECT string_agg(event, ',' ORDER BY id) FROM ekm.audit_log WHERE detail->>'job_id' = '${rb%%:*}'")" '^rollback_started,rollback_done$'

# In the middle of a rotation, with writers.
setconf ekm.rotation_batch_pause 30
job=$(q app "SELECT job_id FROM ekm_rotate(batch_size => 200, force => true) LIMIT 1")
K3=$(active)
q app "CREATE TABLE legacy3 (v text); INSERT INTO legacy3 VALUES (ekm_encrypt('on K3'))" >/dev/null
for _ in $(seq 1 100); do [ "$(q app "SELECT rows_done > 0 FROM ekm.rotation_job WHERE job_id = $job")" = t ] && break; sleep 0.1; done
check_match "rollback is refused while a rotation runs" "$(qerr app "SELECT * FROM ekm_rollback()")" "^ERROR:  55006: rotation job $job is already running"
q app "SELECT ekm_rotation_cancel($job)" >/dev/null
sleep 0.5
check_match "mid-rotation: values are on both keys" "$(q app "SELECT count(DISTINCT ekm_key_id(email)) FROM people WHERE email LIKE 'ekm1:%'")" '^2$'
start_writers cipher
pause_hold app check
rb_out=$(q app "SELECT job_id || ':' || from_key || ':' || to_key FROM ekm_rollback()")
tx0=$(committed)
rb=$(printf '%s\n' "$rb_out" | grep -v '^NOTICE')
check_match "superseding the cancelled rotation is said" "$rb_out" "NOTICE:  ekm: unfinished job $job \\(cancelled\\) is superseded by a rollback"
resetconf ekm.rotation_batch_pause
check "rollback in the middle of a rotation goes back to the key before it" "${rb#*:}" "$K3:$K1"
check "the interrupted rotation is marked superseded" "$(q app "SELECT state || ':' || error FROM ekm.rotation_job WHERE job_id = $job")" "failed:superseded by a rollback"
writers_overlap "${rb%%:*}" check
pause_release
stop_writers
state=$(wait_job app "${rb%%:*}" 300)
check "the mid-rotation rollback finishes under concurrent writers" "$state" done
check "writers saw no errors (nor a failed connection)" "$(client_errors "$dir"/writer*.err)" 0
check "every value is back on the previous key" "$(on_key "$K1")" "$(( $(total) - 6 ))"
check "no write lost" "$(consistent)" "$(total)"
check "the half-used key is retired" "$(state_of "$K3")" retired

# 3. Cleanup of old keys.
check "nothing is retired for more than 365 days" "$(q app "SELECT count(*) FROM ekm_cleanup_old_keys()")" 0
check_match "negative days are refused" "$(qerr app "SELECT * FROM ekm_cleanup_old_keys(-1)")" '^ERROR:  22023: days must be 0 or more'
q app "SELECT ekm_register_column('legacy', 'v')" >/dev/null
check_match "without a scan of the database since their retirement, both keys are kept" \
  "$(q app "SELECT string_agg(action, ',') FROM ekm_cleanup_old_keys(0, dry_run => true) WHERE key_id = '$K3'")" '^kept: no scan of the database has run since it was retired'
scan=$(q app "SELECT job_id FROM ekm_scan_database()")
check "a scan of the database finishes" "$(wait_job app "$scan" 300)" done
material() { q app "SELECT count(*) FROM ekm.key_material WHERE wrapped IS NOT NULL"; }
m_before=$(material)
# K3 has no value in a registered column, but one in legacy3, which is not
# registered: the scan found it, so K3 is kept too, unless forced
check_match "dry run: a key in use is kept, so is one the scan found outside registered columns" \
  "$(q app "SELECT string_agg(CASE key_id WHEN '$K2' THEN 'K2' WHEN '$K3' THEN 'K3' END || '=' || values_in_use || ':' || action, ',' ORDER BY CASE key_id WHEN '$K2' THEN 1 ELSE 2 END) FROM ekm_cleanup_old_keys(0, dry_run => true)")" \
  "^K2=1:kept: 1 values in registered columns still use it,K3=0:kept: the scan of the database finished .* found values on it in (public\\.)?legacy3.v: 1 "
check "the dry run destroys nothing" "$(material):$(state_of "$K3")" "$m_before:retired"
check_match "cleanup warns about the keys it keeps" "$(cpsql "$dir" "$port" -d app -At -q -c "SELECT count(*) FROM ekm_cleanup_old_keys(0)" 2>&1 | tr '\n' ' ')" \
  "WARNING:  ekm: key $K2 is kept: 1 values in registered columns still use it .*WARNING:  ekm: key $K3 is kept: the scan of the database"
check "both are kept" "$(state_of "$K3"):$(state_of "$K2")" "retired:retired"
check_match "force destroys the key the scan found, with a warning" \
  "$(cpsql "$dir" "$port" -d app -At -q -c "SELECT count(*) FROM ekm_cleanup_old_keys(0, force => true)" 2>&1 | tr '\n' ' ')" \
  "WARNING:  ekm: key $K3 is destroyed with force => true although the scan of the database"
check "and audits it" "$(q app "SELECT count(*) FROM ekm.audit_log WHERE key_id = '$K3' AND event = 'key_destroy_forced'")" 1
check "the unused key is destroyed; the key in use and the active key are not" "$(state_of "$K3"):$(state_of "$K2"):$(state_of "$K1")" "destroyed:retired:active"
check "its material is erased, its row kept" "$(q app "SELECT (wrapped IS NULL)::text || ':' || (SELECT destroyed_at IS NOT NULL FROM ekm.key WHERE key_id = '$K3') FROM ekm.key_material WHERE key_id = '$K3'")" "true:true"
check_match "destruction is audited" "$(q app "SELECT string_agg(event, ',' ORDER BY id) FROM ekm.audit_log WHERE key_id = '$K3' AND event IN ('key_destroyed', 'key_material_erased')")" 'key_destroyed,key_material_erased'
check_match "a value on the destroyed key is a clear error" "$(qerr app "SELECT ekm_decrypt(v) FROM legacy3")" '^ERROR:  55000: key key_X is destroyed and cannot decrypt'
check_match "rollback to a destroyed key is refused" "$(qerr app "SELECT * FROM ekm_rollback()")" '^ERROR:  55000: the previous key key_X was destroyed'

# 4. Health.
check_match "a value on a retired key is reported" "$(health unusable_values):$(health_detail unusable_values)" '^failed:.*legacy.v: 1 on retired keys'
q app "SELECT ekm_unregister_column('legacy', 'v')" >/dev/null
check_match "the scan's finds outside registered columns are a warning" "$(health unregistered_ciphertexts):$(health_detail unregistered_ciphertexts)" '^warning:.*legacy3.v: 1 values'
q app "DROP TABLE legacy, legacy3" >/dev/null
scan=$(q app "SELECT job_id FROM ekm_scan_database()")
check "a new scan finishes" "$(wait_job app "$scan" 300)" done
check "all checks pass" "$(q app "SELECT ekm_health_status()")" ok
check "one row per check" "$(q app "SELECT string_agg(\"check\", ',' ORDER BY \"check\" COLLATE \"C\") FROM ekm_health()")" \
  "active_key,auto_rotation,decrypt_keys,encryptions,key_age,log_statement,master_key,registered_columns,rotation_jobs,round_trip,unregistered_ciphertexts,unusable_values"
q postgres "CREATE DATABASE other" >/dev/null; q other "CREATE EXTENSION ekm" >/dev/null
foreign_ct=$(q other "SELECT ekm_encrypt('from another database')")
q app "INSERT INTO people VALUES (-1, '$foreign_ct', NULL, 0)" >/dev/null
check_match "a value on an unknown key is reported" "$(health unusable_values):$(health_detail unusable_values)" '^failed:.*people.email: 1 on unknown keys'
check_match "the one-line status names the worst status and the check" "$(q app "SELECT ekm_health_status()")" '^failed: unusable_values$'
q app "DELETE FROM people WHERE id = -1" >/dev/null
q app "INSERT INTO people VALUES (-2, ekm_encrypt('bound elsewhere', 'public.other.email'), NULL, 0)" >/dev/null
check_match "a value bound to another context is reported (a rotation would stop at it)" \
  "$(health unusable_values):$(health_detail unusable_values)" '^failed:.*people.email: 1 not decrypting with the registered context'
q app "DELETE FROM people WHERE id = -2" >/dev/null
q app "CREATE TABLE gone (id int, secret text)" >/dev/null
q app "SELECT ekm_register_column('gone', 'secret')" >/dev/null
q app "ALTER TABLE gone DROP COLUMN secret" >/dev/null
check_match "a dropped registered column is reported" "$(health registered_columns):$(health_detail registered_columns)" '^failed:.*gone.secret'
check_match "cleanup refuses while a registered column is missing" "$(qerr app "SELECT * FROM ekm_cleanup_old_keys(0)")" '^ERROR:  55000: a registered column no longer exists'
q app "SELECT ekm_unregister_column('gone', 'secret')" >/dev/null
# a stuck job: its worker is terminated and nothing restarts it
setconf ekm.rotation_batch_pause 50
job=$(q app "SELECT job_id FROM ekm_rotate(batch_size => 100, force => true) LIMIT 1")
for _ in $(seq 1 100); do
  wpid=$(q app "SELECT pid FROM pg_stat_activity WHERE backend_type = 'ekm rotation'")
  [ -n "$wpid" ] && break; sleep 0.1
done
check "a running job with its worker is ok" "$(health rotation_jobs)" ok
q app "SELECT pg_terminate_backend($wpid)" >/dev/null
for _ in $(seq 1 50); do [ -z "$(q app "SELECT pid FROM pg_stat_activity WHERE backend_type = 'ekm rotation'")" ] && break; sleep 0.1; done
check_match "a stuck job is reported with the command that resumes it" "$(health rotation_jobs):$(health_detail rotation_jobs)" "^failed:job $job is running but no worker .*ekm_rotation_resume\\($job\\)"
resetconf ekm.rotation_batch_pause
q app "SELECT ekm_rotation_resume($job)" >/dev/null
check "the resumed job finishes" "$(wait_job app "$job" 300)" done
check "and the check passes again" "$(health rotation_jobs)" ok
# a wrong master key
kdir=$dir/keys; mkdir -p "$kdir"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$kdir/wrong"
chmod 600 "$kdir/wrong"; [ "$(id -u)" -eq 0 ] && chown -R "$EKM_PG_USER" "$kdir"
setconf ekm.master_key_file "$kdir/wrong"
check_match "a wrong master key is reported" "$(health master_key):$(health_detail master_key)" '^failed:.*do not unwrap under it.*key check value mismatch'
check "the round trip fails with it" "$(health round_trip)" failed
check_match "the one-line status" "$(q app "SELECT ekm_health_status()")" '^failed: master_key, .*round_trip'
check "no key material in the health report" "$(q app "SELECT count(*) FROM ekm_health() WHERE detail ILIKE '%$(cat "$kdir/wrong")%'")" 0
setconf ekm.master_key_file "$MK"
check "with the right master key it passes again" "$(health master_key):$(health round_trip)" "ok:ok"
# too many keys that decrypt, left rotating by hand
for _ in 1 2 3 4 5 6; do q app "SELECT ekm_activate_key(ekm_create_key())" >/dev/null; done
check_match "more than 5 decrypt-capable keys is a warning" "$(health decrypt_keys):$(health_detail decrypt_keys)" '^warning:7 keys can decrypt'
check_match "rotating keys with no job are a warning" "$(health rotation_jobs):$(health_detail rotation_jobs)" '^warning:6 keys are rotating but no job'
check_match "status: worst is warning" "$(q app "SELECT ekm_health_status()")" '^warning: rotation_jobs, decrypt_keys$'
job=$(q app "SELECT job_id FROM ekm_rotate(force => true) LIMIT 1")
check "a rotation gathers them" "$(wait_job app "$job" 300)" done
check "and the checks pass" "$(health decrypt_keys):$(health rotation_jobs)" "ok:ok"

# A table never analyzed: batches are sized in rows (sampled), not blocks.
q app "CREATE TABLE fresh (id int, v text); INSERT INTO fresh SELECT g, ekm_encrypt('f' || g) FROM generate_series(1, 20000) g" >/dev/null
q app "SELECT ekm_register_column('fresh', 'v')" >/dev/null
check "the new table has no statistics" "$(q app "SELECT reltuples < 0 FROM pg_class WHERE oid = 'fresh'::regclass")" t
job=$(q app "SELECT job_id FROM ekm_rotate(batch_size => 500, force => true) LIMIT 1")
check_match "a batch of 500 rows spans a few blocks, not 500" "$(q app "SELECT blocks_per_batch FROM ekm.rotation_cursor WHERE job_id = $job AND tbl = 'fresh'::regclass")" '^[1-9]$'
check "that rotation finishes" "$(wait_job app "$job" 300)" done
check "every value of the new table is on the active key" "$(q app "SELECT count(*) FROM fresh WHERE ekm_key_id(v) = (SELECT key_id FROM ekm.keys WHERE is_active) AND ekm_decrypt(v) = 'f' || id")" 20000
q app "SELECT ekm_unregister_column('fresh', 'v')" >/dev/null

# A transaction older than the key switch holds the retirement back, and
# the job says so.
coproc OLD { cpsql "$dir" "$port" -d app -At -q 2>&1; }
echo "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 'snapshot taken';" >&"${OLD[1]}"
IFS= read -r -t 20 line <&"${OLD[0]}"
job=$(q app "SELECT job_id FROM ekm_rotate(force => true) LIMIT 1")
# (other sessions' statements may be counted too for a moment: wait for 1)
for _ in $(seq 1 300); do [[ "$(q app "SELECT waiting_for FROM ekm.rotation_job WHERE job_id = $job")" == "1 transactions"* ]] && break; sleep 0.1; done
check_match "the job shows what it waits for" "$(q app "SELECT DISTINCT waiting_for FROM ekm.rotation_progress WHERE job_id = $job")" '^1 transactions that were running when the last pass ended \(pids [0-9]+\)'
check_match "and health says so" "$(health_detail rotation_jobs)" "^job $job is running; waiting for 1 transactions"
echo "COMMIT;" >&"${OLD[1]}"; exec {OLD[1]}>&-; wait "$OLD_PID" 2>/dev/null
check "when it ends the job finishes" "$(wait_job app "$job" 120)" done
check "and the note is gone" "$(q app "SELECT waiting_for IS NULL FROM ekm.rotation_job WHERE job_id = $job")" t

# Throttling reaches a running worker on reload.
setconf ekm.rotation_batch_pause 1000
job=$(q app "SELECT job_id FROM ekm_rotate(batch_size => 100, force => true) LIMIT 1")
sleep 2
check "with a 1 s pause between batches the job moves slowly" "$(( $(q app "SELECT rows_done FROM ekm.rotation_job WHERE job_id = $job") <= 1000 ))" 1
# The worker keeps a table's batch between batches: a rename in between must
# not break it.
q app "ALTER TABLE people RENAME TO people_renamed" >/dev/null
resetconf ekm.rotation_batch_pause
check "after a reload without the pause it finishes (100,000 rows at 1 batch/s would take 1,000 s), through a rename of the table" "$(wait_job app "$job" 120)" done
check_match "every value of the renamed table is on the active key" "$(q app "SELECT count(*) FILTER (WHERE CASE WHEN email LIKE 'ekm1:%' THEN ekm_key_id(email) <> '$(active)' ELSE false END) || ' of ' || count(*) FILTER (WHERE email LIKE 'ekm1:%') FROM people_renamed")" '^0 of [0-9]+$'
q app "ALTER TABLE people_renamed RENAME TO people" >/dev/null

# 5. Keys needing rotation, and the policy settings (reload).
check "no key needs rotation" "$(q app "SELECT count(*) FROM ekm_keys_needing_rotation()")" 0
check "alert date = due date - 14 days (runbook phase 4)" "$(q app "SELECT next_rotation_due - rotation_alert_at FROM ekm_key_status()")" "14 days"
setconf ekm.rotation_due_age_days 0
check_match "a due key is listed with its reason" "$(q app "SELECT key_id || ':' || reason FROM ekm_keys_needing_rotation()")" "^$(active):age: 0 days"
check "and health warns" "$(health key_age)" warning
resetconf ekm.rotation_due_age_days
setconf ekm.rotation_due_encryptions 1
check_match "the encryption count makes a key due" "$(q app "SELECT reason FROM ekm_keys_needing_rotation()")" '^encryptions: [0-9]+ of the 1 allowed'
check "and health warns" "$(health encryptions)" warning
resetconf ekm.rotation_due_encryptions
check "all checks pass" "$(q app "SELECT ekm_health_status()")" ok

# Encryption counts are written down by the launcher (they live in shared
# memory between flushes), so a restart does not lose them.
stored() { q app "SELECT encryptions FROM ekm.key WHERE rotation_status = 'active'"; }
s0=$(stored)
q app "SELECT count(ekm_encrypt('count me')) FROM generate_series(1, 1000)" >/dev/null
for _ in $(seq 1 50); do [ "$(stored)" -ge $((s0 + 1000)) ] && break; sleep 0.1; done
check "the launcher writes encryption counts to ekm.key" "$(( $(stored) - s0 >= 1000 ))" 1
seen=$(q app "SELECT encryptions FROM ekm.keys WHERE is_active")
cluster_stop "$dir"; cluster_restart_only "$dir"
check "encryption counts survive a restart" "$(( $(q app "SELECT encryptions FROM ekm.keys WHERE is_active") >= seen ))" 1

# 6. Automatic rotation.
q other "CREATE TABLE t (v text); INSERT INTO t VALUES (ekm_encrypt('x')); SELECT ekm_register_column('t', 'v')" >/dev/null
# A registered table whose owner planted a trigger that tries to make itself
# superuser: with automatic rotation no DBA acts, and the worker is a
# superuser. The trigger must run as the table's owner.
q app "DROP ROLE IF EXISTS ekm_ops_owner; CREATE ROLE ekm_ops_owner IN ROLE ekm_user;
       CREATE SCHEMA hostile AUTHORIZATION ekm_ops_owner" >/dev/null
q app "SET ROLE ekm_ops_owner;
       CREATE TABLE hostile.t (id int PRIMARY KEY, v text);
       CREATE TABLE hostile.log (who name, superuser boolean, escalated boolean);
       GRANT INSERT ON hostile.log TO PUBLIC;
       CREATE FUNCTION hostile.trg() RETURNS trigger LANGUAGE plpgsql AS \$\$
       BEGIN
         BEGIN
           EXECUTE 'ALTER ROLE ekm_ops_owner SUPERUSER';
           INSERT INTO hostile.log SELECT current_user, rolsuper, true FROM pg_roles WHERE rolname = current_user;
         EXCEPTION WHEN OTHERS THEN
           INSERT INTO hostile.log SELECT current_user, rolsuper, false FROM pg_roles WHERE rolname = current_user;
         END;
         RETURN NEW;
       END \$\$;
       CREATE TRIGGER hostile BEFORE UPDATE ON hostile.t FOR EACH ROW EXECUTE FUNCTION hostile.trg();
       INSERT INTO hostile.t SELECT g, ekm_encrypt('h' || g) FROM generate_series(1, 10) g" >/dev/null
q app "SELECT ekm_register_column('hostile.t', 'v')" >/dev/null
n_app=$(jobs); n_other=$(q other "SELECT count(*) FROM ekm.rotation_job")
setconf ekm.rotation_due_age_days 0
sleep 3
check "off by default: a due key is not rotated" "$(jobs)" "$n_app"
before_auto=$(active)
setconf ekm.auto_rotate_databases app
setconf ekm.auto_rotate on
for _ in $(seq 1 100); do [ "$(jobs)" -gt "$n_app" ] && break; sleep 0.1; done
auto=$(q app "SELECT job_id FROM ekm.rotation_job WHERE requested_by = 'ekm auto-rotation' ORDER BY job_id LIMIT 1")
check_match "on: the launcher starts a rotation when the key is due" "$auto" '^[0-9]+$'
check "the automatic rotation finishes" "$(wait_job app "$auto" 300)" done
check "it is audited like a manual one" "$(q app "SELECT detail->>'automatic' FROM ekm.audit_log WHERE event = 'rotation_started' AND detail->>'job_id' = '$auto'")" true
check "the hostile trigger ran during the automatic rotation, as the table's owner, not a superuser" \
  "$(q app "SELECT string_agg(DISTINCT who || ':' || superuser || ':' || escalated, ',') FROM hostile.log")" "ekm_ops_owner:false:false"
check "its owner did not become superuser" "$(q app "SELECT rolsuper FROM pg_roles WHERE rolname = 'ekm_ops_owner'")" f
# (the key stays due: the next automatic rotation may already have begun)
check "the hostile table's values moved off the old key, and decrypt" \
  "$(q app "SELECT count(*) FROM hostile.t WHERE ekm_key_id(v) <> '$before_auto' AND ekm_decrypt(v) = 'h' || id")" 10
resetconf ekm.rotation_due_age_days
sleep 1; n_app=$(jobs); sleep 3
check "not due: no further rotation" "$(jobs)" "$n_app"
check "a database not listed is not rotated" "$(q other "SELECT count(*) FROM ekm.rotation_job")" "$n_other"
check "every value still decrypts" "$(consistent)" "$(total)"
# after a rollback automatic rotation waits for a manual rotation
rb=$(q app "SELECT job_id FROM ekm_rollback()")
check "the rollback finishes" "$(wait_job app "$rb" 300)" done
setconf ekm.rotation_due_age_days 0
n_app=$(jobs); sleep 3
check "after a rollback automatic rotation does not undo it" "$(jobs)" "$n_app"
check_match "health says why" "$(health auto_rotation):$(health_detail auto_rotation)" '^warning:paused since rollback job'
setconf ekm.auto_rotate off
resetconf ekm.rotation_due_age_days

# 6. The health failures not met above, each simulated in a database of its
#    own. The catalog edits go around ekm's guards (a superuser with
#    triggers off), as only a damaged or hand-edited catalog would.
q postgres "CREATE DATABASE h" >/dev/null; q h "CREATE EXTENSION ekm" >/dev/null
hh() { q h "SELECT status || ':' || detail FROM ekm_health() WHERE \"check\" = '$1'"; }
hack() { q h "SET session_replication_role = replica; $1" >/dev/null; }
q h "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, ekm_encrypt('v' || g) FROM generate_series(1, 2000) g; SELECT ekm_register_column('t', 'v')" >/dev/null
hack "UPDATE ekm.key SET created_at = created_at - interval '400 days' WHERE rotation_status = 'active'"
check_match "an expired key fails key_age, with the command that fixes it" "$(hh key_age)" '^failed:key_.* expired on [0-9-]+ \(400 days old\): SELECT ekm_rotate\(\)'
hack "UPDATE ekm.key SET created_at = created_at + interval '400 days' WHERE rotation_status = 'active'"
hack "UPDATE ekm.key SET encryptions = 4294967296 WHERE rotation_status = 'active'"
check_match "a key at the random-nonce bound fails encryptions" "$(hh encryptions)" '^failed:key_.* encrypted 42949[0-9]{5} values \(100\.0+% of the 2\^32 random-nonce bound\): rotate now'
hack "UPDATE ekm.key SET encryptions = 0 WHERE rotation_status = 'active'"
hack "UPDATE ekm.key SET rotation_status = 'rotating' WHERE rotation_status = 'active'"
check_match "no active key fails active_key, with the command that fixes it" "$(hh active_key)" '^failed:no key is active: nothing can be encrypted; SELECT ekm_activate_key\(key_id\)'
hack "UPDATE ekm.key SET rotation_status = 'active' WHERE rotation_status = 'rotating'"
check "and with the key active again every check passes" "$(q h "SELECT ekm_health_status()")" ok
# A row an application holds: the batch gives up its wait after
# ekm.rotation_lock_timeout and goes on without the row (SKIP LOCKED); later
# passes come back for it. The application's transaction is not disturbed.
session_start 11 locker h
session_send 11 "BEGIN; SELECT 'locked' FROM t WHERE id = 1 FOR UPDATE;"
session_line locker '^locked$' >/dev/null
job=$(q h "SELECT job_id FROM ekm_rotate(force => true) LIMIT 1")
new_key=$(q h "SELECT key_id FROM ekm.keys WHERE is_active")
moved() { q h "SELECT count(*) FROM t WHERE ekm_key_id(v) = '$new_key'"; }
for _ in $(seq 1 300); do [ "$(moved)" = 1999 ] && break; sleep 0.1; done
check "every row but the locked one moves, and the job keeps running" "$(moved):$(q h "SELECT state FROM ekm.rotation_job WHERE job_id = $job")" "1999:running"
session_send 11 "UPDATE t SET v = ekm_encrypt('locker wrote') WHERE id = 1; COMMIT; SELECT 'committed';"
check "the application's transaction goes through" "$(session_line locker '^committed$')" committed
session_end 11 locker
check "the job then finishes" "$(wait_job h "$job" 120)" done
check "with the application's write kept" "$(q h "SELECT ekm_decrypt(v) FROM t WHERE id = 1")" "locker wrote"
check "the application saw no error" "$(client_errors "$dir/locker.out")" 0
# A deadlock between a batch and an application: the worker runs its own
# deadlock check after a fifth of its lock timeout, long before the
# application's (deadlock_timeout), so the worker is the one the deadlock
# detector cancels; it retries, the application goes on. Made
# deterministic: the application holds the table's last row, the worker
# (held, then let go) locks the rows of that page before it and waits for
# it, then the application asks for the page's first row. Server
# deadlock_timeout 60 s and ekm.rotation_lock_timeout 25 s: the worker's
# check comes 5 s into its wait (the application asks well before), its
# lock timeout at 25 s, the application's check at 60 s.
setconf deadlock_timeout 60s; setconf ekm.rotation_lock_timeout 25000; setconf log_lock_waits on
last=$(q h "SELECT id FROM t ORDER BY ctid DESC LIMIT 1")
first=$(q h "SELECT id FROM t WHERE (ctid::text::point)[0] = (SELECT (ctid::text::point)[0] FROM t WHERE id = $last) ORDER BY ctid LIMIT 1")
session_start 11 app h
session_send 11 "BEGIN; UPDATE t SET v = ekm_encrypt('app last') WHERE id = $last; SELECT 'holding';"
session_line app '^holding$' >/dev/null
pause_hold h batch
job=$(q h "SELECT job_id FROM ekm_rotate(batch_size => 100000, force => true) LIMIT 1")
check "the worker waits at its first batch" "$(paused_at h batch)" yes
pause_release
worker_waits() { q h "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE a.backend_type = 'ekm rotation' AND NOT l.granted AND l.locktype = 'transactionid'"; }
for _ in $(seq 1 300); do [ "$(worker_waits)" = 1 ] && break; sleep 0.02; done
check "the worker's batch waits for the application's row" "$(worker_waits)" 1
session_send 11 "UPDATE t SET v = ekm_encrypt('app first') WHERE id = $first; COMMIT; SELECT 'committed';"
check "the application's transaction commits (the worker lost the deadlock)" "$(session_line app '^committed$')" committed
session_end 11 app
check "the application saw no error" "$(client_errors "$dir/app.out")" 0
check "the job finishes" "$(wait_job h "$job" 120)" done
check_match "the worker logged the deadlock and retried" "$(grep -c "ekm: rotation job $job: batch skipped (deadlock detected" "$dir/server.log")" '^[1-9]'
# the configured lock timeout held even though the worker had paused
# (a pause point resets the step's timeouts; they once came out 10x shorter)
waited=$(grep -E -o 'detected deadlock while waiting for ShareLock on transaction [0-9]+ after [0-9]+' "$dir/server.log" | tail -n 1 | grep -E -o '[0-9]+$')
check "the worker's deadlock check came a fifth of its lock timeout into the wait (${waited:-none} ms)" "$([ "${waited:-0}" -ge 5000 ] && echo yes)" yes
check "the application's writes are kept" "$(q h "SELECT ekm_decrypt(v) FROM t WHERE id = $first"),$(q h "SELECT ekm_decrypt(v) FROM t WHERE id = $last")" "app first,app last"
resetconf ekm.rotation_lock_timeout; resetconf deadlock_timeout; resetconf log_lock_waits
# More sessions waiting in ekm_rotation_wait than it has slots (64): the
# job is held at its first batch, 64 sessions wait for it, the next one is
# refused with the way to follow the job instead; the 64 see it finish.
pause_hold h batch
job=$(q h "SELECT job_id FROM ekm_rotate(force => true) LIMIT 1")
check "the worker waits at its first batch" "$(paused_at h batch)" yes
waiter_pids=()
in_wait() { q h "SELECT count(*) FROM pg_stat_activity WHERE application_name = '$1' AND wait_event_type = 'Extension'"; }
registered=0
for i in $(seq 1 64); do
  PGAPPNAME=waiter$i cpsql "$dir" "$port" -d h -At -q -c "SELECT state FROM ekm_rotation_wait($job, 600)" >"$dir/waiter$i.out" 2>&1 11>&- 12>&- 13>&- 14>&- &
  waiter_pids+=($!)
  # one at a time: a session seen in the wait's latch has taken its slot
  for _ in $(seq 1 200); do [ "$(in_wait "waiter$i")" = 1 ] && { registered=$((registered + 1)); break; }; sleep 0.02; done
done
check "64 sessions wait for the job, each in its slot" "$registered" 64
check "the 65th waiting session is refused with 53400" "$(qerr h "SELECT state FROM ekm_rotation_wait($job, 0.1)")" "ERROR:  53400: more than 64 sessions are waiting for rotation jobs"
check_match "with the way to follow the job instead" \
  "$(cpsql "$dir" "$port" -d h -At -q -c "SELECT state FROM ekm_rotation_wait($job, 0.1)" 2>&1 | grep '^HINT')" 'ekm\.rotation_progress'
check "the job is still running, and its progress reads" "$(q h "SELECT job_state || ':' || count(*) FROM ekm.rotation_progress WHERE job_id = $job GROUP BY job_state")" "running:1"
pause_release
for p in "${waiter_pids[@]}"; do wait "$p"; done
check "the 64 waiting sessions saw the job done" "$(cat "$dir"/waiter*.out | grep -c '^done$')" 64
check "and none had an error" "$(client_errors "$dir"/waiter*.out)" 0
check_match "a slot is free again: a wait returns" "$(wait_job h "$job" 10)" '^done$'
old_copy=$(q h "SELECT v FROM t WHERE id = 1")
pause_hold h batch
job=$(q h "SELECT job_id FROM ekm_rotate(force => true) LIMIT 1")
check "the worker waits at its first batch" "$(paused_at h batch)" yes
q h "SELECT ekm_rotation_cancel($job)" >/dev/null
pause_release
check_match "a cancelled job is a warning, with the command that resumes it" "$(hh rotation_jobs)" "^warning:job $job was cancelled before it finished; values stay decryptable: SELECT ekm_rotation_resume\\($job\\)"
hack "UPDATE ekm.rotation_job SET state = 'failed', error = 'simulated' WHERE job_id = $job"
check_match "a failed job with keys still rotating is a warning, with the command" "$(hh rotation_jobs)" "^warning:job $job failed \\(simulated\\) and keys are still rotating: SELECT ekm_rotation_resume\\($job\\)"
check_match "that command resumes it" "$(q h "SELECT ekm_rotation_resume($job)")" "failed -> running"
check "and it finishes" "$(wait_job h "$job" 120)" done
scan=$(q h "SELECT job_id FROM ekm_scan_database()")
check "a scan finds no value left on the old key" "$(wait_job h "$scan" 120)" done
check_match "the old key is destroyed by cleanup" "$(q h "SELECT string_agg(action, ',') FROM ekm_cleanup_old_keys(0)")" '^destroyed'
# a value restored from a backup taken before the rotation
q h "UPDATE t SET v = '$old_copy' WHERE id = 1" >/dev/null
check_match "a value on a destroyed key fails unusable_values" "$(hh unusable_values)" '^failed:values that cannot be decrypted: (public\.)?t\.v: 1 on destroyed keys'
check_match "and reading it is an error with its SQLSTATE" "$(qerr h "SELECT ekm_decrypt(v) FROM t WHERE id = 1")" '^ERROR:  55000: '
check "every value decrypts at the end" "$(consistent)" "$(total)"
check_match "no worker left running" "$(q app "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'ekm rotation'")" '^0$'
check_log_clean "$dir/server.log"
tap_done
