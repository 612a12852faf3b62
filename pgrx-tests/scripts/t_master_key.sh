#!/usr/bin/env bash
# The master key's sources: the development default, a file, a command; a
# wrong, missing or malformed key is a clear ERROR and changes nothing; the
# key never reaches the log. Drives a real cluster with reloads and restarts.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib.sh"
source "$here/tap.sh"
dir=/tmp/ekm-mk; port=61434
trap 'cluster_stop "$dir" immediate >/dev/null 2>&1 || true' EXIT
cluster_start "$dir" "$port" "ekm.debug_pause_points = on" || exit 1
source "$here/pause.sh"
q() { cpsql "$dir" "$port" -d "${DB:-postgres}" -At -q -c "$1" 2>&1; }
# Runs a statement, printing SQLSTATE and message on error (key ids masked).
qerr() {
  cpsql "$dir" "$port" -d "${DB:-postgres}" -At -q -v VERBOSITY=verbose -c "$1" 2>&1 \
    | sed -E 's/key_[0-9]{8}_[0-9]{6}_[0-9a-f]{4}/key_X/g' | grep -E '^ERROR' | head -n 1
}
reload() { q "SELECT pg_reload_conf()" >/dev/null; sleep 1; }

# 1. Development default: created once, 0600, announced at WARNING.
keyfile=$dir/data/ekm_dev_master.key
check "dev key file created at start" "$(test -f "$keyfile" && echo yes)" yes
check "dev key file mode 0600" "$(stat -c %a "$keyfile")" 600
check_match "log says it is a development default" "$(grep -c 'WARNING:  ekm: created a DEVELOPMENT DEFAULT master key' "$dir/server.log")" '^1$'
devkey=$(cat "$keyfile")
q "CREATE EXTENSION ekm" >/dev/null
ct=$(q "SELECT ekm_encrypt('dev secret')")
check "dev default encrypts and decrypts" "$(q "SELECT ekm_decrypt('$ct')")" "dev secret"
check_match "status names the dev default" "$(q "SELECT master_key_source FROM ekm_key_status()")" '^development default \(.*ekm_dev_master.key\)$'
cluster_stop "$dir"; cluster_restart_only "$dir"
check "restart keeps the same dev key" "$(cat "$keyfile")" "$devkey"
check_match "restart warns it is still the dev default" "$(grep -c 'using the DEVELOPMENT DEFAULT master key' "$dir/server.log")" '^[1-9]'
check "dev key still decrypts after restart" "$(q "SELECT ekm_decrypt('$ct')")" "dev secret"

# 2. A configured key file.
mk1=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
mk2=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
kdir=$dir/keys; mkdir -p "$kdir"
printf '%s\n' "$mk1" > "$kdir/mk1"; printf '%s\n' "$mk2" > "$kdir/mk2"
printf 'not a key\n' > "$kdir/bad"
printf '%s' "$mk1" | xxd -r -p | base64 > "$kdir/mk1.b64"
chmod 600 "$kdir"/*; [ "$(id -u)" -eq 0 ] && chown -R "$EKM_PG_USER" "$kdir"
q "ALTER SYSTEM SET ekm.master_key_file = '$kdir/mk1'" >/dev/null; reload
q "CREATE DATABASE filedb" >/dev/null
DB=filedb q "CREATE EXTENSION ekm" >/dev/null
check_match "status names the key file" "$(DB=filedb q "SELECT master_key_source FROM ekm_key_status()")" '^ekm.master_key_file \(.*/mk1\)$'
ct1=$(DB=filedb q "SELECT ekm_encrypt('file secret')")
check "file key decrypts in a new session" "$(DB=filedb q "SELECT ekm_decrypt('$ct1')")" "file secret"
wrapped_before=$(DB=filedb q "SELECT md5(string_agg(key_id || encode(wrapped, 'hex') || encode(master_kcv, 'hex'), ',' ORDER BY key_id)) FROM ekm.key_material")
check_match "the first database's keys need the dev key" "$(qerr "SELECT ekm_decrypt('$ct')")" '^ERROR:  28000: ekm master key does not match the one key key_X was wrapped with'

# 3. Wrong master key: a clear error, nothing written.
q "ALTER SYSTEM SET ekm.master_key_file = '$kdir/mk2'" >/dev/null; reload
check_match "wrong key: decrypt names the mismatch" "$(DB=filedb qerr "SELECT ekm_decrypt('$ct1')")" '^ERROR:  28000: ekm master key does not match the one key key_X was wrapped with \(key check value mismatch\)'
check_match "wrong key: encrypt names the mismatch" "$(DB=filedb qerr "SELECT ekm_encrypt('x')")" '^ERROR:  28000: '
check_match "wrong key: no new key is wrapped under it" "$(DB=filedb qerr "SELECT ekm_create_key()")" '^ERROR:  28000: '
check "wrong key: key material unchanged" "$(DB=filedb q "SELECT md5(string_agg(key_id || encode(wrapped, 'hex') || encode(master_kcv, 'hex'), ',' ORDER BY key_id)) FROM ekm.key_material")" "$wrapped_before"

# 4. Missing and malformed keys.
q "ALTER SYSTEM SET ekm.master_key_file = '$kdir/nonexistent'" >/dev/null; reload
check_match "missing key file" "$(DB=filedb qerr "SELECT ekm_decrypt('$ct1')")" '^ERROR:  58000: ekm master key is not available: ekm.master_key_file: cannot open .*nonexistent'
q "ALTER SYSTEM SET ekm.master_key_file = '$kdir/bad'" >/dev/null; reload
check_match "malformed key file" "$(DB=filedb qerr "SELECT ekm_decrypt('$ct1')")" '^ERROR:  F0000: ekm master key from ekm.master_key_file is not a 256-bit key'
q "ALTER SYSTEM SET ekm.master_key_file = '$kdir/mk1.b64'" >/dev/null; reload
check "base64 form of the same key works" "$(DB=filedb q "SELECT ekm_decrypt('$ct1')")" "file secret"

# 5. A command.
q "ALTER SYSTEM RESET ekm.master_key_file" >/dev/null
q "ALTER SYSTEM SET ekm.master_key_command = 'cat $kdir/mk1'" >/dev/null; reload
check "command key decrypts" "$(DB=filedb q "SELECT ekm_decrypt('$ct1')")" "file secret"
check_match "status names the command, not its text" "$(DB=filedb q "SELECT master_key_source FROM ekm_key_status()")" '^ekm.master_key_command$'
q "ALTER SYSTEM SET ekm.master_key_command = 'exit 3'" >/dev/null; reload
check_match "failing command" "$(DB=filedb qerr "SELECT ekm_decrypt('$ct1')")" '^ERROR:  58000: ekm master key is not available: ekm.master_key_command failed \(exit status: 3\)'
q "ALTER SYSTEM SET ekm.master_key_command = 'echo nonsense'" >/dev/null; reload
check_match "command printing garbage" "$(DB=filedb qerr "SELECT ekm_decrypt('$ct1')")" '^ERROR:  F0000: ekm master key from ekm.master_key_command is not a 256-bit key'
q "ALTER SYSTEM SET ekm.master_key_command = 'cat $kdir/mk1'" >/dev/null; reload
check "back to the right key: everything decrypts" "$(DB=filedb q "SELECT ekm_decrypt('$ct1')")" "file secret"

# 5b. The command's text is never shown: not to pg_monitor (which has
#     pg_read_all_settings), not even to a superuser.
q "ALTER SYSTEM SET ekm.master_key_command = 'cat $kdir/mk1; : token=CMD-TOKEN-9137'" >/dev/null; reload
q "DROP ROLE IF EXISTS ekm_mon; CREATE ROLE ekm_mon LOGIN IN ROLE pg_monitor" >/dev/null
mon() { cpsql "$dir" "$port" -d postgres -U ekm_mon -At -q -c "$1" 2>&1; }
check "pg_monitor: SHOW ekm.master_key_command is (hidden)" "$(mon "SHOW ekm.master_key_command")" "(hidden)"
check "pg_monitor: current_setting() is (hidden)" "$(mon "SELECT current_setting('ekm.master_key_command')")" "(hidden)"
check "pg_monitor: pg_settings does not list the key settings" "$(mon "SELECT count(*) FROM pg_settings WHERE name IN ('ekm.master_key_command', 'ekm.master_key_file')")" 0
check "pg_monitor: SHOW ALL does not list them" "$(mon "SHOW ALL" | grep -cE '^ekm\.master_key_(command|file)\|')" 0
check "superuser: SHOW ekm.master_key_command is (hidden) too" "$(q "SHOW ekm.master_key_command")" "(hidden)"
check "an unset key file shows empty" "$(q "SHOW ekm.master_key_file")" ""
check "the command with a token still works" "$(DB=filedb q "SELECT ekm_decrypt('$ct1')")" "file secret"
# A command that hangs is stopped at ekm.master_key_command_timeout, with
# everything it started; a statement cancel stops it too.
q "ALTER SYSTEM SET ekm.master_key_command_timeout = 1" >/dev/null
q "ALTER SYSTEM SET ekm.master_key_command = 'sleep 31.25; cat $kdir/mk1'" >/dev/null; reload
t0=$(date +%s%N)
check_match "a hanging command times out" "$(DB=filedb qerr "SELECT ekm_decrypt('$ct1')")" '^ERROR:  58000: ekm master key is not available: ekm.master_key_command did not finish within ekm.master_key_command_timeout \(1 s\) and was stopped'
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
check_match "within about the timeout (${ms} ms)" "$(( ms < 5000 ))" '^1$'
check "nothing it started is left running" "$(pgrep -c -f 'sleep 31.25')" 0
q "ALTER SYSTEM SET ekm.master_key_command_timeout = 60" >/dev/null; reload
t0=$(date +%s%N)
check_match "a statement cancel stops the command" "$(DB=filedb qerr "SET statement_timeout = '700ms'; SELECT ekm_decrypt('$ct1')")" '^ERROR:  57014: canceling statement due to statement timeout'
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
check_match "at once (${ms} ms)" "$(( ms < 5000 ))" '^1$'
check "and nothing it started is left running" "$(pgrep -c -f 'sleep 31.25')" 0
# A failure is not remembered: the same session succeeds once the cause is fixed.
q "ALTER SYSTEM SET ekm.master_key_command = 'exit 4'" >/dev/null; reload
same_session=$(cpsql "$dir" "$port" -d filedb -At -q -v ON_ERROR_STOP=0 \
  -c "SELECT ekm_decrypt('$ct1')" \
  -c "ALTER SYSTEM SET ekm.master_key_command = 'cat $kdir/mk1'" -c "SELECT pg_reload_conf()" -c "SELECT pg_sleep(1)" \
  -c "SELECT ekm_decrypt('$ct1')" 2>&1 | grep -v -e '^t$' -e '^$' -e '^HINT:' | sed -E 's/^ERROR: +//' | tr '\n' '|')
check_match "one session: the failed command, then (after the fix) the plaintext" "$same_session" '^ekm master key is not available: ekm.master_key_command failed \(exit status: 4\)\|file secret\|$'
q "ALTER SYSTEM RESET ekm.master_key_command_timeout" >/dev/null; reload

# 5c. Master key rotation: the new key becomes the current setting, the old
#     one the previous setting; keys keep working throughout; one call
#     re-wraps every key, with no value touched; then the previous setting
#     goes. Meanwhile a data-key rotation runs.
fp() { DB=filedb q "SELECT string_agg(DISTINCT master_key_fingerprint, ',') FROM ekm.keys WHERE master_key_fingerprint IS NOT NULL"; }
fp1=$(fp)
check "the status shows the configured key's fingerprint, the keys' own" "$(DB=filedb q "SELECT master_key_fingerprint FROM ekm_key_status()")" "$fp1"
check_match "a fingerprint is 16 hex digits, never the key" "$fp1:$(grep -c "$fp1" "$kdir/mk1")" '^[0-9a-f]{16}:0$'
DB=filedb q "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, ekm_encrypt('v' || g, 't.v') FROM generate_series(1, 5000) g; SELECT ekm_register_column('t', 'v', 't.v')" >/dev/null
q "ALTER SYSTEM SET ekm.rotation_batch_pause = 100" >/dev/null; reload
# the data-key job is held at a batch (pause point) while the master key
# rotates: it provably runs throughout
job=$(DB=filedb q "SELECT job_id FROM ekm_rotate(batch_size => 100, force => true) LIMIT 1")
for _ in $(seq 1 200); do [ "$(DB=filedb q "SELECT rows_done > 0 FROM ekm.rotation_job WHERE job_id = $job")" = t ] && break; sleep 0.05; done
pause_hold filedb batch
check "a data-key rotation is running, held at a batch" \
  "$(DB=filedb q "SELECT state || ':' || (rows_done > 0) FROM ekm.rotation_job WHERE job_id = $job"):$(paused_at filedb batch)" "running:true:yes"
q "ALTER SYSTEM RESET ekm.master_key_command" >/dev/null
q "ALTER SYSTEM SET ekm.master_key_file = '$kdir/mk2'" >/dev/null
q "ALTER SYSTEM SET ekm.previous_master_key_file = '$kdir/mk1'" >/dev/null; reload
check "during the rotation a new session decrypts (keys unwrap under the previous key)" "$(DB=filedb q "SELECT ekm_decrypt('$ct1')")" "file secret"
check_match "health says the rotation is under way" "$(DB=filedb q "SELECT status || ': ' || detail FROM ekm_health() WHERE \"check\" = 'master_key'")" '^warning: a master key rotation is under way: [0-9]+ of [0-9]+ keys are still wrapped under the previous master key'
check_match "no key is created under the new key before the rotation" "$(DB=filedb qerr "SELECT ekm_create_key()")" "^ERROR:  55000: a master key rotation is under way: keys are wrapped under master key fingerprint $fp1"
material_before=$(DB=filedb q "SELECT md5(string_agg(key_id || encode(wrapped, 'hex'), ',' ORDER BY key_id)) FROM ekm.key_material")
out=$(DB=filedb q "SELECT string_agg(DISTINCT action || ':' || from_fingerprint || '>' || (to_fingerprint <> from_fingerprint), ',') FROM ekm_rotate_master_key()" | grep -v '^NOTICE')
check_match "ekm_rotate_master_key() re-wraps every key under the new key" "$out" "^re-wrapped:$fp1>true$"
fp2=$(DB=filedb q "SELECT master_key_fingerprint FROM ekm_key_status()")
check "every key now names the new key's fingerprint" "$(fp)" "$fp2"
check "the wrapped forms changed" "$(DB=filedb q "SELECT md5(string_agg(key_id || encode(wrapped, 'hex'), ',' ORDER BY key_id)) <> '$material_before' FROM ekm.key_material")" t
check "it is idempotent" "$(DB=filedb q "SELECT string_agg(DISTINCT action, ',') FROM ekm_rotate_master_key()" | grep -v '^NOTICE')" "already under the configured master key"
check "it is audited, without key material" "$(DB=filedb q "SELECT count(*) FROM ekm.audit_log WHERE event = 'master_key_rotated' AND detail->>'to_fingerprint' = '$fp2' AND detail::text NOT LIKE '%$(cat "$kdir/mk2")%'")" 2
check "the data-key rotation is still running, held, after the master key rotation" \
  "$(DB=filedb q "SELECT state FROM ekm.rotation_job WHERE job_id = $job"):$(paused_at filedb batch)" "running:yes"
pause_release
check "the data-key rotation running meanwhile finishes" "$(DB=filedb q "SELECT state FROM ekm_rotation_wait($job, 120)" | tail -n 1)" done
q "ALTER SYSTEM RESET ekm.rotation_batch_pause" >/dev/null; reload
check "every value decrypts in a new session, on the rotation's new key" \
  "$(DB=filedb q "SELECT count(*) FROM t WHERE ekm_decrypt(v, 't.v') = 'v' || id AND ekm_key_id(v) = (SELECT key_id FROM ekm.keys WHERE is_active)")" 5000
check_match "health: the previous setting is still set but no key needs it" "$(DB=filedb q "SELECT status || ': ' || detail FROM ekm_health() WHERE \"check\" = 'master_key'")" '^warning: every key unwraps under .* but a previous master key is still configured'
check_match "a database with keys under neither key: refused, nothing changed" \
  "$(qerr "SELECT * FROM ekm_rotate_master_key()")" "^ERROR:  28000: ekm master key does not match the one key key_X was wrapped with .*the configured master key has fingerprint $fp2 \(and previous $fp1\)"
q "ALTER SYSTEM SET ekm.previous_master_key_file = '$kdir/mk2'" >/dev/null; reload
check_match "the same key as current and previous is refused" "$(DB=filedb qerr "SELECT * FROM ekm_rotate_master_key()")" '^ERROR:  22023: the previous master key setting holds the same key as the current one'
q "ALTER SYSTEM RESET ekm.previous_master_key_file" >/dev/null; reload
check "without the previous setting: health ok" "$(DB=filedb q "SELECT status FROM ekm_health() WHERE \"check\" = 'master_key'")" ok
check_match "the old master key no longer opens anything, and the error names the fingerprint expected" \
  "$(q "ALTER SYSTEM SET ekm.master_key_file = '$kdir/mk1'" >/dev/null; reload; DB=filedb qerr "SELECT ekm_decrypt(v, 't.v') FROM t LIMIT 1")" "^ERROR:  28000: .*the key expects master key fingerprint $fp2, the configured master key has fingerprint $fp1"
q "ALTER SYSTEM SET ekm.master_key_file = '$kdir/mk2'" >/dev/null; reload

# 6. Nothing secret in the log: no master key, no plaintext of a failed statement.
DB=filedb qerr "SELECT ekm_decrypt(ekm_encrypt('PLAINTEXT-MARKER-42', 'a'), 'b')" >/dev/null
check_match "the failed statement's error is logged" "$(grep -c 'could not be authenticated' "$dir/server.log")" '^[1-9]'
check_match "a reload logs that the command changed, without its text" "$(grep -c 'parameter "ekm.master_key_command" changed (its value is not logged)' "$dir/server.log")" '^[1-9]'
for secret in "$devkey" "$mk1" "$mk2" "$(cat "$kdir/mk1.b64")" PLAINTEXT-MARKER-42 CMD-TOKEN-9137; do
  check "log never holds ${secret:0:6}…" "$(grep -c -- "$secret" "$dir/server.log")" 0
done
cluster_stop "$dir"
check_log_clean "$dir/server.log"
tap_done
