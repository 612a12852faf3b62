#!/usr/bin/env bash
# Plaintext stays out of the server log (issue 12): statements that passed
# plaintext through ekm fail for reasons of their own (a cast error, a
# unique violation, a check violation), are logged as slow statements and by
# auto_explain, or are logged by log_statement; a failed ekm_decrypt too.
# The whole server log is then searched for every plaintext marker. The
# same kinds of statements without ekm still log their values (the control),
# and with ekm.log_redaction = off the markers appear (it does something).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib.sh"
source "$here/tap.sh"
dir=/tmp/ekm-redaction; port=61447
trap 'cluster_stop "$dir" immediate >/dev/null 2>&1 || true' EXIT
cluster_start "$dir" "$port" "shared_preload_libraries = 'ekm,auto_explain'" \
  "auto_explain.log_min_duration = 0" "auto_explain.log_verbose = on" "log_min_duration_statement = 0" || exit 1
q() { cpsql "$dir" "$port" -d postgres -At -q -v ON_ERROR_STOP=0 -c "$1" 2>&1; }
q "CREATE EXTENSION ekm" >/dev/null
q "CREATE TABLE u (e text UNIQUE); CREATE TABLE c (v text CHECK (length(v) < 5)); CREATE TABLE people (id int, email text)" >/dev/null
q "SELECT ekm_register_column('people', 'email')" >/dev/null
log=$dir/server.log
markers=()
# statements that passed plaintext through ekm
check_match "a cast error after ekm_decrypt is an error" "$(q "SELECT ekm_decrypt(ekm_encrypt('4111111111111111'))::int")" '^ERROR:  value "\(redacted by ekm\)" is out of range for type integer'
markers+=(4111111111111111)
q "INSERT INTO u VALUES (ekm_decrypt(ekm_encrypt('secret-ssn-123')))" >/dev/null
check_match "a unique violation on a decrypted value still tells the client its key" \
  "$(q "INSERT INTO u VALUES (ekm_decrypt(ekm_encrypt('secret-ssn-123')))")" 'DETAIL:  Key \(e\)=\(secret-ssn-123\) already exists'
markers+=(secret-ssn-123)
check_match "a check violation" "$(q "INSERT INTO c VALUES (ekm_decrypt(ekm_encrypt('MARKER-CHECK-777')))")" '^ERROR:  new row for relation "c" violates check constraint'
markers+=(MARKER-CHECK-777)
q "SELECT ekm_encrypt('MARKER-SLOW-555')" >/dev/null   # log_min_duration_statement = 0, auto_explain
markers+=(MARKER-SLOW-555)
check_match "a failed ekm_decrypt" "$(q "SELECT ekm_decrypt(ekm_encrypt('MARKER-DECRYPT-999', 'a'), 'b')")" '^ERROR:  ekm ciphertext could not be authenticated'
markers+=(MARKER-DECRYPT-999)
q "SELECT 1 / 0, ekm_encrypt('MARKER-BEFORE-131')" >/dev/null   # fails before ekm runs
markers+=(MARKER-BEFORE-131)
# log_statement = 'all' from the configuration (a SET in the same string
# as the statement takes effect too late: the string is logged first)
q "ALTER SYSTEM SET log_statement = 'all'" >/dev/null; q "SELECT pg_reload_conf()" >/dev/null; sleep 0.5
q "SELECT ekm_encrypt('MARKER-LOGSTMT-212')" >/dev/null
markers+=(MARKER-LOGSTMT-212)
q "SELECT 'CONTROL-LOGSTMT-3'" >/dev/null
check_match "log_statement = 'all' logs a statement without ekm (the control)" "$(grep -c 'statement: SELECT .CONTROL-LOGSTMT-3.' "$log")" '^[1-9]'
check_match "log_statement = 'all' logs the ekm statement, without its text" "$(grep -c 'LOG:  statement: (redacted by ekm)' "$log")" '^[1-9]'
# Master key settings under log_statement = 'ddl': ALTER SYSTEM (what the
# runbook recommends), SET and ALTER ROLE ... SET; never reloaded here, so
# the server keeps its master key.
q "ALTER SYSTEM SET log_statement = 'ddl'" >/dev/null; q "SELECT pg_reload_conf()" >/dev/null; sleep 0.5
q "ALTER SYSTEM SET ekm.master_key_command = 'vault read -field=key secret/ekm token=MKTOKEN-4242'" >/dev/null
q "ALTER SYSTEM RESET ekm.master_key_command" >/dev/null
markers+=(MKTOKEN-4242)
q "SET ekm.previous_master_key_file = '/etc/MKTOKEN-SET-77'" >/dev/null
markers+=(MKTOKEN-SET-77)
q "ALTER ROLE postgres SET ekm.master_key_command = 'cat /MKTOKEN-ROLE-5'" >/dev/null
markers+=(MKTOKEN-ROLE-5)
q "ALTER SYSTEM SET work_mem = '4242kB'" >/dev/null; q "ALTER SYSTEM RESET work_mem" >/dev/null
check_match "log_statement = 'ddl' logs ALTER SYSTEM of other settings (the control)" "$(grep -c "statement: ALTER SYSTEM SET work_mem = '4242kB'" "$log")" '^[1-9]'
check_match "ALTER SYSTEM SET ekm.master_key_command is logged without its text" "$(grep -c 'LOG:  statement: (redacted by ekm)' "$log")" '^[2-9]'
q "ALTER SYSTEM SET log_statement = 'none'" >/dev/null; q "SELECT pg_reload_conf()" >/dev/null; sleep 0.5
# A deadlock reported by a session that never named ekm: its DETAIL quotes
# the other session's statement, which passes plaintext through ekm. B
# waits first with a long deadlock_timeout, so A is the one that reports.
source "$here/pause.sh"
q "CREATE TABLE dla (id int PRIMARY KEY, v text); INSERT INTO dla VALUES (1, 'a'), (2, 'b')" >/dev/null
session_start 11 dla_a postgres
session_start 12 dla_b postgres
session_send 11 "SET deadlock_timeout = '200ms'; BEGIN; UPDATE dla SET v = 'a1' WHERE id = 1; SELECT 'a-has-1';"
session_line dla_a '^a-has-1$' >/dev/null
session_send 12 "SET deadlock_timeout = '60s'; BEGIN; UPDATE dla SET v = 'b2' WHERE id = 2; SELECT 'b-has-2';"
session_line dla_b '^b-has-2$' >/dev/null
session_send 12 "UPDATE dla SET v = ekm_encrypt('PLAIN-DL-42') WHERE id = 1; COMMIT; SELECT 'b-done';"
for _ in $(seq 1 200); do
  [ "$(q "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'")" = 1 ] && break
  sleep 0.05
done
session_send 11 "UPDATE dla SET v = 'CONTROL-DL-a2' WHERE id = 2; ROLLBACK; SELECT 'a-done';"
session_line dla_a '^a-done$' >/dev/null
session_line dla_b '^b-done$' >/dev/null
session_end 11 dla_a; session_end 12 dla_b
markers+=(PLAIN-DL-42)
check_match "session A got the deadlock" "$(cat "$dir/dla_a.out")" 'deadlock detected'
check_match "the deadlock report is logged with the reporting session's own statement (the control)" \
  "$(grep -c "Process [0-9]*: UPDATE dla SET v = 'CONTROL-DL-a2' WHERE id = 2" "$log")" '^[1-9]'
check_match "the other session's statement in it is left out" "$(grep -c 'Process [0-9]*: (redacted by ekm)' "$log")" '^[1-9]'
# the same kinds of statements without ekm
q "SELECT 'CONTROL-5222222222222222'::int" >/dev/null
q "INSERT INTO u VALUES ('CONTROL-SSN-1'); INSERT INTO u VALUES ('CONTROL-SSN-1')" >/dev/null
q "SELECT 'CONTROL-SLOW-2'" >/dev/null
sleep 0.5
for m in "${markers[@]}"; do
  check "the server log never holds $m" "$(grep -c -- "$m" "$log")" 0
done
check_match "it says what it left out" "$(grep -c '(redacted by ekm)' "$log")" '^[1-9]'
check_match "the cast error is logged, its value left out" "$(grep -c 'ERROR:  value "(redacted by ekm)" is out of range for type integer' "$log")" '^[1-9]'
check_match "the unique violation is logged, its DETAIL left out" "$(grep -A1 'duplicate key value violates unique constraint "u_e_key"' "$log" | grep -c 'DETAIL:  (redacted by ekm)')" '^[1-9]'
check_match "the slow statement is logged, without its text" "$(grep -c 'duration: .* ms  statement: (redacted by ekm)' "$log")" '^[1-9]'
check_match "auto_explain's plan is left out" "$(grep -c 'plan: (redacted by ekm)' "$log")" '^[1-9]'
for m in CONTROL-5222222222222222 CONTROL-SSN-1 CONTROL-SLOW-2; do
  check_match "statements without ekm log as before ($m)" "$(grep -c -- "$m" "$log")" '^[1-9]'
done
check "health warns about log_statement = 'all' with registered columns" \
  "$(q "SET log_statement = 'all'; SELECT status FROM ekm_health() WHERE \"check\" = 'log_statement'" | tail -n 1)" warning
q "ALTER SYSTEM SET ekm.log_redaction = off" >/dev/null; q "SELECT pg_reload_conf()" >/dev/null; sleep 0.5
q "SELECT ekm_decrypt(ekm_encrypt('OFF-6333333333333333'))::int" >/dev/null
check_match "with ekm.log_redaction = off the value is logged (the setting works)" "$(grep -c 'OFF-6333333333333333' "$log")" '^[1-9]'
check_match "ekm.log_redaction is for superusers only" \
  "$(q "CREATE ROLE r LOGIN; GRANT ekm_user TO r" >/dev/null; cpsql "$dir" "$port" -d postgres -U r -At -q -c "SET ekm.log_redaction = off" 2>&1)" 'permission denied to set parameter "ekm.log_redaction"'
# pg_stat_statements keeps utility statements as written, out of ekm's
# reach (README): health says so while it is loaded and tracks them.
check "without pg_stat_statements health does not warn about it" \
  "$(q "SELECT count(*) FROM ekm_health() WHERE detail LIKE '%pg_stat_statements%'")" 0
q "ALTER SYSTEM SET shared_preload_libraries = ekm, auto_explain, pg_stat_statements" >/dev/null
cluster_stop "$dir" && cluster_restart_only "$dir"
q "CREATE EXTENSION pg_stat_statements" >/dev/null
q "ALTER SYSTEM SET ekm.master_key_command = 'cat /PGSS-TOKEN-8'" >/dev/null; q "ALTER SYSTEM RESET ekm.master_key_command" >/dev/null
if [ "$(q "SHOW server_version_num")" -lt 180000 ]; then
  check "pg_stat_statements does keep the ALTER SYSTEM text (the copy the README warns about)" \
    "$(q "SELECT count(*) > 0 FROM pg_stat_statements WHERE query ~ 'PGSS.TOKEN.8'")" t
  check_match "health warns while pg_stat_statements tracks utility statements" \
    "$(q "SELECT status || ': ' || detail FROM ekm_health() WHERE \"check\" = 'log_statement'")" '^warning: pg_stat_statements is loaded'
else
  # PostgreSQL 18 replaces ALTER SYSTEM's value by $1 as it does other constants
  check "PostgreSQL 18: pg_stat_statements keeps ALTER SYSTEM without its value" \
    "$(q "SELECT count(*) FILTER (WHERE query ~ 'PGSS.TOKEN.8') || ':' || count(*) FILTER (WHERE query = 'ALTER SYSTEM SET ekm.master_key_command = \$1') FROM pg_stat_statements")" 0:1
  check "PostgreSQL 18: health does not warn about pg_stat_statements" \
    "$(q "SELECT status FROM ekm_health() WHERE \"check\" = 'log_statement'")" ok
fi
check "the server log never holds PGSS-TOKEN-8" "$(grep -c -- PGSS-TOKEN-8 "$log")" 0
check "no crash" "$(grep -cE 'terminated by signal|PANIC' "$log")" 0
check_log_clean "$dir/server.log"
tap_done
