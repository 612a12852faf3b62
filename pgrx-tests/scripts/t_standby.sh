#!/usr/bin/env bash
# A streaming replica (hot standby): values decrypt there; key status and
# metadata are plain queries there; a key activated on the primary reaches
# a standby session that already cached the old key (the relcache
# invalidation is replayed from WAL); nothing on the decrypt path writes.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib.sh"
source "$here/tap.sh"
p=/tmp/ekm-primary; pport=61435
s=/tmp/ekm-standby; sport=61436
cleanup() {
  [ -n "${COPROC_PID:-}" ] && kill "$COPROC_PID" 2>/dev/null
  cluster_stop "$s" immediate >/dev/null 2>&1; cluster_stop "$p" immediate >/dev/null 2>&1
}
trap cleanup EXIT
cluster_start "$p" "$pport" || exit 1
qp() { cpsql "$p" "$pport" -d postgres -At -q -c "$1" 2>&1; }
qs() { cpsql "$s" "$sport" -d postgres -At -q -c "$1" 2>&1; }

qp "CREATE EXTENSION ekm" >/dev/null
qp "CREATE TABLE people (id int PRIMARY KEY, email text)" >/dev/null
qp "INSERT INTO people SELECT g, ekm_encrypt('user' || g || '@example.com', 'people.email') FROM generate_series(1, 1000) g" >/dev/null

# The base backup carries the data directory (and with it the development
# key file; a production master key comes from ekm.master_key_command).
rm -rf "$s"; mkdir -p "$s"; [ "$(id -u)" -eq 0 ] && chown "$EKM_PG_USER" "$s"
as_pg "$PGBIN/pg_basebackup" -h "$p" -p "$pport" -U postgres -D "$s/data" -R -X stream >/dev/null 2>&1 \
  || { not_ok "pg_basebackup"; tap_done; exit 1; }
as_pg sed -i -e "s/^port = .*/port = $sport/" -e "s|^unix_socket_directories = .*|unix_socket_directories = '$s'|" "$s/data/postgresql.conf"
cluster_restart_only "$s" || { not_ok "standby start"; tap_done; exit 1; }
check "standby is in recovery" "$(qs "SELECT pg_is_in_recovery()")" t
wait_replay() {
  local lsn; lsn=$(qp "SELECT pg_current_wal_lsn()")
  for _ in $(seq 1 100); do
    [ "$(qs "SELECT pg_last_wal_replay_lsn() >= '$lsn'::pg_lsn")" = t ] && return 0
    sleep 0.1
  done
  return 1
}
wait_replay
check "values decrypt on the standby" "$(qs "SELECT count(*) FROM people WHERE ekm_decrypt(email, 'people.email') = 'user' || id || '@example.com'")" 1000
check "key status works on the standby" "$(qs "SELECT active_keys_count FROM ekm_key_status()")" 1
check "key metadata works on the standby" "$(qs "SELECT count(*) FROM ekm.keys WHERE is_active")" 1

# A long-lived standby session caches the keys now.
coproc PSQL { cpsql "$s" "$sport" -d postgres -At -q 2>&1; }
ask() { echo "$1" >&"${PSQL[1]}"; local line; IFS= read -r -t 20 line <&"${PSQL[0]}"; echo "$line"; }
old=$(ask "SELECT ekm_key_id(ekm_encrypt('x'));")
check "standby session: encrypts (read-only) with the active key" "$old" "$(qs "SELECT key_id FROM ekm.keys WHERE is_active")"

# Activate a new key on the primary and write a value under it.
new=$(qp "SELECT ekm_activate_key(ekm_create_key())")
qp "UPDATE people SET email = ekm_encrypt('changed@example.com', 'people.email') WHERE id = 1" >/dev/null
wait_replay
check "standby session sees the new active key at its next statement" "$(ask "SELECT ekm_key_id(ekm_encrypt('x'));")" "$new"
check "standby session decrypts the value written under the new key" "$(ask "SELECT ekm_decrypt(email, 'people.email') FROM people WHERE id = 1;")" "changed@example.com"
check "standby session still decrypts values on the old (rotating) key" "$(ask "SELECT count(*) FROM people WHERE ekm_decrypt(email, 'people.email') LIKE 'user%';")" 999
check "standby reports the rotating key" "$(ask "SELECT string_agg(rotation_status, ',' ORDER BY rotation_status) FROM ekm.keys;")" "active,rotating"
check_match "ekm_rotate is refused on a standby, with the reason" "$(cpsql "$s" "$sport" -d postgres -At -q -v VERBOSITY=verbose -c "SELECT * FROM ekm_rotate(force => true)" 2>&1 | grep -E '^ERROR' | head -n 1)" '^ERROR:  25006: cannot rotate keys on a standby'
qerr_s() { cpsql "$s" "$sport" -d postgres -At -q -v VERBOSITY=verbose -c "$1" 2>&1 | grep -E '^ERROR' | head -n 1; }
qp "SELECT ekm_register_column('people', 'email', 'people.email')" >/dev/null
wait_replay
check "health runs on the standby: one row per check, none failed" \
  "$(qs "SELECT count(*) || ':' || count(*) FILTER (WHERE status = 'failed') FROM ekm_health()")" "12:0"
check_match "the one-line health status runs on the standby" "$(qs "SELECT ekm_health_status()")" '^(ok|warning: .*)$'
check "keys needing rotation runs on the standby" "$(qs "SELECT count(*) FROM ekm_keys_needing_rotation()")" 0
check_match "a migration's dry run runs on the standby" "$(qs "SELECT plaintext_values || ':' || encrypted_values FROM ekm_encrypt_column('people', 'email', 100, true)")" '^0:1000$'
check_match "ekm_rollback is refused on a standby" "$(qerr_s "SELECT * FROM ekm_rollback()")" '^ERROR:  25006: cannot roll keys back on a standby'
check_match "ekm_cleanup_old_keys is refused on a standby" "$(qerr_s "SELECT * FROM ekm_cleanup_old_keys(0)")" '^ERROR:  25006: cannot destroy keys on a standby'
check_match "ekm_encrypt_column is refused on a standby" "$(qerr_s "SELECT * FROM ekm_encrypt_column('people', 'email', 100, false)")" '^ERROR:  25006: cannot encrypt a column on a standby'
# Nothing on the decrypt path writes: decrypting every value (the first
# statement of a session: the keys are loaded too) assigns no transaction id.
check "decrypting assigns no transaction id (writes nothing)" \
  "$(cpsql "$p" "$pport" -d postgres -At -q -c "BEGIN" -c "SELECT count(ekm_decrypt(email, 'people.email')) FROM people" -c "SELECT pg_current_xact_id_if_assigned() IS NULL" -c "COMMIT" 2>&1 | tr '\n' ' ')" "1000 t "

# Master key rotation on the primary; the standby follows once its
# configuration has the new key. (mk1: the development key both started
# with, as a file; mk2: a new key.)
kdir=/tmp/ekm-standby-keys; rm -rf "$kdir"; mkdir -p "$kdir"
cp "$p/data/ekm_dev_master.key" "$kdir/mk1"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$kdir/mk2"
chmod 600 "$kdir"/*; [ "$(id -u)" -eq 0 ] && chown -R "$EKM_PG_USER" "$kdir"
qp "ALTER SYSTEM SET ekm.master_key_file = '$kdir/mk2'" >/dev/null
qp "ALTER SYSTEM SET ekm.previous_master_key_file = '$kdir/mk1'" >/dev/null
qp "SELECT pg_reload_conf()" >/dev/null; sleep 1
check_match "ekm_rotate_master_key is refused on a standby" "$(qerr_s "SELECT * FROM ekm_rotate_master_key()")" '^ERROR:  25006: cannot rotate the master key on a standby'
check "the primary re-wraps every key" "$(qp "SELECT string_agg(DISTINCT action, ',') FROM ekm_rotate_master_key()" | grep -v '^NOTICE')" "re-wrapped"
fp2=$(qp "SELECT master_key_fingerprint FROM ekm_key_status()")
wait_replay
check "the standby replays the re-wrapped keys" "$(qs "SELECT string_agg(DISTINCT master_key_fingerprint, ',') FROM ekm.keys WHERE master_key_fingerprint IS NOT NULL")" "$fp2"
check "a standby session that had loaded its keys keeps decrypting" "$(ask "SELECT count(*) FROM people WHERE ekm_decrypt(email, 'people.email') IS NOT NULL;")" 1000
check_match "a new standby session, still configured with the old key, is refused with the fingerprint it needs" \
  "$(qerr_s "SELECT count(ekm_decrypt(email, 'people.email')) FROM people")" "^ERROR:  28000: .*the key expects master key fingerprint $fp2"
check_match "the standby's health says which key is missing" "$(qs "SELECT status || ': ' || detail FROM ekm_health() WHERE \"check\" = 'master_key'")" "^failed: .*expects master key fingerprint $fp2"
printf "ekm.master_key_file = '%s/mk2'\n" "$kdir" | as_pg tee -a "$s/data/postgresql.conf" >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$s/data" reload >/dev/null; sleep 1
check "after its reload the standby decrypts in new sessions" "$(qs "SELECT count(*) FROM people WHERE ekm_decrypt(email, 'people.email') IS NOT NULL")" 1000
check "and its master key check passes" "$(qs "SELECT status FROM ekm_health() WHERE \"check\" = 'master_key'")" ok
# Throttling on replica lag: with the standby's replay paused, a rotation
# pauses once its replay lag exceeds ekm.rotation_max_replica_lag, says so
# in throttled_by, and goes on once replay resumes and catches up.
echo "wal_receiver_status_interval = 1" | as_pg tee -a "$s/data/postgresql.conf" >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$s/data" reload >/dev/null
qp "CREATE TABLE lagged (id int PRIMARY KEY, v text)" >/dev/null
qp "INSERT INTO lagged SELECT g, ekm_encrypt('lagged ' || g, 'lagged.v') FROM generate_series(1, 50000) g" >/dev/null
qp "SELECT ekm_register_column('lagged', 'v', 'lagged.v')" >/dev/null
qp "ALTER SYSTEM SET ekm.rotation_max_replica_lag = 200" >/dev/null
qp "ALTER SYSTEM SET ekm.rotation_batch_pause = 20" >/dev/null
qp "SELECT pg_reload_conf()" >/dev/null
wait_replay
qs "SELECT pg_wal_replay_pause()" >/dev/null
job=$(qp "SELECT DISTINCT job_id FROM ekm_rotate(batch_size => 200, force => true)" | grep -v NOTICE)
throttled=""
for _ in $(seq 1 600); do
  throttled=$(qp "SELECT throttled_by FROM ekm.rotation_job WHERE job_id = $job")
  [ -n "$throttled" ] && break; sleep 0.05
done
check_match "lag: with replay paused the rotation is throttled, naming the standby" "$throttled" \
  "^replica lag: standby '[^']+' replays [0-9]+ ms behind \\(ekm.rotation_max_replica_lag = 200 ms\\)$"
check "lag: the job is still running, its old key rotating" "$(qp "SELECT j.state || ':' || k.rotation_status FROM ekm.rotation_job j JOIN ekm.keys k ON k.key_id = j.from_key WHERE j.job_id = $job")" "running:rotating"
r1=$(qp "SELECT rows_done FROM ekm.rotation_job WHERE job_id = $job")
sleep 1.5
check "lag: no batch runs while the standby lags" "$(qp "SELECT rows_done FROM ekm.rotation_job WHERE job_id = $job")" "$r1"
check_match "lag: progress shows it" "$(qp "SELECT DISTINCT throttled_by FROM ekm.rotation_progress WHERE job_id = $job")" '^replica lag: '
qs "SELECT pg_wal_replay_resume()" >/dev/null
check "lag: the rotation finishes once replay resumes" "$(cpsql "$p" "$pport" -d postgres -At -q -c "SELECT state FROM ekm_rotation_wait($job, 120)" 2>/dev/null)" done
check "lag: throttled_by is cleared" "$(qp "SELECT throttled_by IS NULL FROM ekm.rotation_job WHERE job_id = $job")" t
wait_replay
check "lag: every value decrypts on the standby, on the new key" \
  "$(qs "SELECT count(*) FROM lagged WHERE ekm_decrypt(v, 'lagged.v') = 'lagged ' || id AND ekm_key_id(v) = (SELECT key_id FROM ekm.keys WHERE is_active)")" 50000
qp "ALTER SYSTEM RESET ekm.rotation_max_replica_lag" >/dev/null
qp "ALTER SYSTEM RESET ekm.rotation_batch_pause" >/dev/null
qp "SELECT pg_reload_conf()" >/dev/null

check_log_clean "$p/server.log"
check_log_clean "$s/server.log"
tap_done
