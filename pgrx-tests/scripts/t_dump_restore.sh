#!/usr/bin/env bash
# pg_dump of a database using ekm restores into a new database of a cluster
# with the same master key: every value decrypts, nothing is re-encrypted,
# the keys and their states come back, and the restored database's own unused
# first key is retired (kept), not deleted. Restoring over a database whose
# key is in use is refused and changes nothing.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib.sh"
source "$here/tap.sh"
dir=/tmp/ekm-dump; port=61437
trap 'cluster_stop "$dir" immediate >/dev/null 2>&1 || true' EXIT
cluster_start "$dir" "$port" || exit 1
q() { local db=$1; shift; cpsql "$dir" "$port" -d "$db" -At -q -c "$1" 2>&1; }

q postgres "CREATE DATABASE origin" >/dev/null
q origin "CREATE EXTENSION ekm" >/dev/null
q origin "CREATE TABLE people (id int PRIMARY KEY, email text, mobno text)" >/dev/null
q origin "INSERT INTO people SELECT g, ekm_encrypt('user' || g || '@example.com', 'public.people.email'), ekm_encrypt('+91' || lpad(g::text, 10, '0')) FROM generate_series(1, 500) g" >/dev/null
q origin "SELECT ekm_activate_key(ekm_create_key())" >/dev/null
q origin "UPDATE people SET email = ekm_encrypt('new' || id || '@example.com', 'public.people.email') WHERE id <= 100" >/dev/null
keys_origin=$(q origin "SELECT string_agg(key_id || ':' || rotation_status, ',' ORDER BY key_id) FROM ekm.keys")
data_origin=$(q origin "SELECT md5(string_agg(email || mobno, ',' ORDER BY id)) FROM people")
check_match "origin has an active and a rotating key" "$keys_origin" 'key_.*:(active|rotating),key_.*:(active|rotating)'

dump=$dir/origin.dump
dump_out=$(as_pg "$PGBIN/pg_dump" -h "$dir" -p "$port" -U postgres -Fc -f "$dump" origin 2>&1); dump_rc=$?
check "pg_dump ran cleanly (exit status 0, no output)" "$dump_rc:$dump_out" "0:"
check_match "and wrote a dump" "$(stat -c %s "$dump" 2>/dev/null || echo 0)" '^[1-9][0-9]+$'
for mode in custom plain; do
  db=restored_$mode
  q postgres "CREATE DATABASE $db" >/dev/null
  if [ $mode = custom ]; then
    out=$(as_pg "$PGBIN/pg_restore" -h "$dir" -p "$port" -U postgres -d "$db" "$dump" 2>&1)
  else
    out=$(as_pg "$PGBIN/pg_dump" -h "$dir" -p "$port" -U postgres origin | cpsql "$dir" "$port" -d "$db" -q 2>&1)
  fi
  check "$mode restore: no errors" "$(printf '%s' "$out" | grep -c ERROR)" 0
  check "$mode restore: every value decrypts" "$(q "$db" "SELECT count(*) FROM people WHERE ekm_decrypt(email, 'public.people.email') IN ('user' || id || '@example.com', 'new' || id || '@example.com') AND ekm_decrypt(mobno) = '+91' || lpad(id::text, 10, '0')")" 500
  check "$mode restore: ciphertexts are byte for byte the dump's (nothing re-encrypted)" "$(q "$db" "SELECT md5(string_agg(email || mobno, ',' ORDER BY id)) FROM people")" "$data_origin"
  check "$mode restore: the dump's keys with their states" "$(q "$db" "SELECT string_agg(key_id || ':' || rotation_status, ',' ORDER BY key_id) FROM ekm.keys WHERE key_id NOT IN (SELECT key_id FROM ekm.audit_log WHERE event = 'key_replaced_by_restore')")" "$keys_origin"
  check "$mode restore: exactly one active key, the dump's" "$(q "$db" "SELECT count(*) FROM ekm.keys WHERE is_active")" 1
  check "$mode restore: its own unused first key is retired, material kept" "$(q "$db" "SELECT count(*) FROM ekm.key k JOIN ekm.key_material m USING (key_id) WHERE k.rotation_status = 'retired' AND m.wrapped IS NOT NULL")" 1
  check "$mode restore: the replacement is audited" "$(q "$db" "SELECT count(*) FROM ekm.audit_log WHERE event = 'key_replaced_by_restore'")" 1
  check "$mode restore: new writes use the restored active key" "$(q "$db" "SELECT ekm_key_id(ekm_encrypt('x')) = (SELECT key_id FROM ekm.keys WHERE is_active)")" t
done

# A database whose key is in use refuses the dump's keys and keeps its own.
q postgres "CREATE DATABASE busy" >/dev/null
q busy "CREATE EXTENSION ekm" >/dev/null
busy_ct=$(q busy "SELECT ekm_encrypt('busy value')")
busy_keys=$(q busy "SELECT string_agg(key_id || ':' || rotation_status, ',') FROM ekm.keys")
out=$(as_pg "$PGBIN/pg_restore" -h "$dir" -p "$port" -U postgres -d busy --data-only -t key "$dump" 2>&1)
check_match "restoring keys over a key in use is refused, with the reason" "$out" 'is already active in this database'
check "the busy database keeps its keys" "$(q busy "SELECT string_agg(key_id || ':' || rotation_status, ',') FROM ekm.keys")" "$busy_keys"
check "and its values decrypt" "$(q busy "SELECT ekm_decrypt('$busy_ct')")" "busy value"

# No background worker slot free (max_worker_processes = 2: ekm's launcher
# and the logical replication launcher take both): the job is recorded,
# stays running and resumable, and the DBA is told how to start it; with
# slots again, it resumes by itself.
cluster_stop "$dir"
echo "max_worker_processes = 2" | as_pg tee -a "$dir/data/postgresql.conf" >/dev/null
cluster_restart_only "$dir"
q busy "CREATE TABLE w (v text); INSERT INTO w SELECT ekm_encrypt('w' || g) FROM generate_series(1, 100) g; SELECT ekm_register_column('w', 'v')" >/dev/null
out=$(cpsql "$dir" "$port" -d busy -At -q -c "SELECT job_id FROM ekm_rotate(force => true)" 2>&1)
job=$(printf '%s\n' "$out" | grep -E '^[0-9]+$')
check_match "with no worker slot free, ekm_rotate records the job" "$job" '^[0-9]+$'
check_match "and says how to start it" "$out" \
  "^WARNING:  ekm: could not start the rotation worker now .*the job stays running: SELECT ekm_rotation_resume\\($job\\) starts it"
check_match "resuming it is refused with the fix while no slot is free" \
  "$(cpsql "$dir" "$port" -d busy -At -q -v VERBOSITY=verbose -c "SELECT ekm_rotation_resume($job)" 2>&1 | tr '\n' ' ')" \
  '^ERROR:  53400: could not start the rotation worker.*HINT:  raise max_worker_processes, or retry when a background worker slot is free'
check_match "health names the stuck job and the command" "$(q busy "SELECT status || ':' || detail FROM ekm_health() WHERE \"check\" = 'rotation_jobs'")" "^failed:job $job is running but no worker"
check "every value still decrypts" "$(q busy "SELECT count(*) FROM w WHERE ekm_decrypt(v) LIKE 'w%'")" 100
cluster_stop "$dir"
as_pg sed -i "\$d" "$dir/data/postgresql.conf"
cluster_restart_only "$dir"
check "with slots again the job resumes by itself and finishes" "$(cpsql "$dir" "$port" -d busy -At -q -c "SELECT state FROM ekm_rotation_wait($job, 120)" 2>/dev/null)" done

# The same cluster restarted without ekm in shared_preload_libraries (a
# configuration mistake): every use of ekm is refused with the fix, nothing
# crashes, and the values are back once the library is preloaded again.
cluster_stop "$dir"
echo "shared_preload_libraries = ''" | as_pg tee -a "$dir/data/postgresql.conf" >/dev/null
cluster_restart_only "$dir"
check_match "without preloading, ekm refuses with the fix" \
  "$(cpsql "$dir" "$port" -d busy -At -q -v VERBOSITY=verbose -c "SELECT ekm_decrypt('$busy_ct')" 2>&1 | tr '\n' ' ')" \
  '^ERROR:  55000: ekm must be loaded at server start .*HINT:  add ekm to shared_preload_libraries in postgresql.conf and restart the server'
check_match "and so does CREATE EXTENSION" \
  "$(cpsql "$dir" "$port" -d postgres -At -q -c "CREATE DATABASE fresh" -c "\\c fresh" -c "CREATE EXTENSION ekm" 2>&1 | tr '\n' ' ')" \
  'ERROR:  ekm must be loaded at server start'
cluster_stop "$dir"
as_pg sed -i "\$d" "$dir/data/postgresql.conf"
cluster_restart_only "$dir"
check "preloaded again, the values decrypt" "$(q busy "SELECT count(*) FROM w WHERE ekm_decrypt(v) LIKE 'w%'")" 100
check_log_clean "$dir/server.log"
tap_done
