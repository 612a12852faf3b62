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
dir=/tmp/ekm-dump; port=55437
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
tap_done
