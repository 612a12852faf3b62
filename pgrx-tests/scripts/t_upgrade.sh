#!/usr/bin/env bash
# Extension upgrades, as a user runs them: build and install ekm 0.1.0 (the
# git tag v0.1.0), use it (encrypted table, registered columns, a finished
# rotation, a second one cancelled mid-way), install this build over it and
# restart (the new library against the old objects must not crash: key
# management refuses with a hint, encryption keeps working), ALTER EXTENSION
# ekm UPDATE, then compare every object with a fresh install of this version,
# decrypt every old value, resume the cancelled job to the end, check the
# audit log, and restore a pg_dump of the updated database into a fresh
# cluster. Leaves this build installed (it runs last in the test command).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
source "$repo/scripts/lib.sh"
source "$here/tap.sh"
dir=/tmp/ekm-upgrade; port=61445
dir2=/tmp/ekm-upgrade-restore; port2=61446
OLD=${EKM_OLD_VERSION:-0.1.0}
NEW=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n1)
old_src=$(mktemp -d /tmp/ekm-old-src.XXXXXX)
installed_old=0
install_new() {
  # the old build shared target/ and left its library where cargo puts this
  # one's: touching a source makes cargo build (and place) this one again
  # (ekm-core too: an old release whose ekm-core had this one's version
  # shares its artifact name)
  touch "$repo/src/lib.rs" "$repo"/ekm-core/src/*.rs
  (cd "$repo" && ekm_install) >"$dir.install-new.log" 2>&1
}
cleanup() {
  cluster_stop "$dir" immediate >/dev/null 2>&1 || true
  cluster_stop "$dir2" immediate >/dev/null 2>&1 || true
  # never leave the old library installed
  [ "$installed_old" -eq 1 ] && install_new
  rm -rf "$old_src"
}
trap cleanup EXIT
q() { cpsql "$dir" "$port" -d app -At -q -c "$1" 2>&1; }
# waits for a job (its NOTICE progress lines are not part of the answer)
wait_job() { cpsql "$dir" "$port" -d app -At -q -c "SELECT state FROM ekm_rotation_wait($1, 300)" 2>/dev/null; }
qerr() { cpsql "$dir" "$port" -d app -At -q -v VERBOSITY=verbose -c "$1" 2>&1 | grep -E '^(ERROR|FATAL|server closed)' | head -n 1; }

# 1. Build and install the released version from its tag (for the server
#    EKM_PG selects: every release since 0.1.0 declares the pg15-pg18 features). (Its
#    .cargo/config.toml built for x86-64-v3; its SQL does not depend on that,
#    and without it the build shares this tree's compiled dependencies.)
# the tag, or (in a clone without tags) the commit it names
tag=v$OLD
[ "$OLD" = 0.1.0 ] && ! git -C "$repo" rev-parse --verify -q "$tag^{commit}" >/dev/null && tag=1d5dcf69c1b971452cf56269cecb2df0d4df7c47
# 0.2.0: the last commit of 0.2.0
[ "$OLD" = 0.2.0 ] && ! git -C "$repo" rev-parse --verify -q "$tag^{commit}" >/dev/null && tag=2cd95a860b5df280a79cf268ed5d775022c10776
# 0.3.0: the last commit of 0.3.0
[ "$OLD" = 0.3.0 ] && ! git -C "$repo" rev-parse --verify -q "$tag^{commit}" >/dev/null && tag=f64ec1bceb7ff0e85a4c97ab64f0e37c5835ee40
# 0.4.0: the last commit of 0.4.0
[ "$OLD" = 0.4.0 ] && ! git -C "$repo" rev-parse --verify -q "$tag^{commit}" >/dev/null && tag=007e3964c8e5d22e061da1eaa2e59638625786bf
# 0.5.0: the last commit of 0.5.0
[ "$OLD" = 0.5.0 ] && ! git -C "$repo" rev-parse --verify -q "$tag^{commit}" >/dev/null && tag=061f056828add2e702691c5496967b2f08e86682
if ! git -C "$repo" rev-parse --verify -q "$tag^{commit}" >/dev/null; then
  not_ok "ekm $OLD ($tag) is in this clone's history"; tap_done; exit 1
fi
git -C "$repo" archive "$tag" | tar -x -C "$old_src"
rm -f "$old_src/.cargo/config.toml"
find "$old_src" -type f -exec touch {} +   # newer than any artifact of the same version
installed_old=1
if (cd "$old_src" && CARGO_TARGET_DIR="$repo/target" ekm_install) >"$dir.install-old.log" 2>&1; then
  ok "ekm $OLD builds and installs from $tag"
else
  tail -n 20 "$dir.install-old.log"; not_ok "ekm $OLD builds and installs from $tag"; tap_done; exit 1
fi

# 2. Use it.
cluster_start "$dir" "$port" "ekm.rotation_retry_pause = 100" || exit 1
cpsql "$dir" "$port" -d postgres -q -c "CREATE DATABASE app" >/dev/null
q "CREATE EXTENSION ekm" >/dev/null
check "the database has ekm $OLD" "$(q "SELECT extversion FROM pg_extension WHERE extname = 'ekm'")" "$OLD"
q "CREATE TABLE people (id int PRIMARY KEY, email text, mobno text, email_shadow text, mobno_shadow text);
   INSERT INTO people SELECT g, ekm_encrypt('user' || g || '@example.com', 'public.people.email'), ekm_encrypt('+91' || g),
                             'user' || g || '@example.com', '+91' || g FROM generate_series(1, 20000) g;
   SELECT ekm_register_column('people', 'email', 'public.people.email');
   SELECT ekm_register_column('people', 'mobno')" >/dev/null
q "ANALYZE people" >/dev/null
job1=$(q "SELECT job_id FROM ekm_rotate(force => true) LIMIT 1")
check "a rotation under $OLD finishes" "$(wait_job "$job1")" done
cpsql "$dir" "$port" -d postgres -q -c "ALTER SYSTEM SET ekm.rotation_batch_pause = 200" -c "SELECT pg_reload_conf()" >/dev/null
sleep 0.5
job2=$(q "SELECT job_id FROM ekm_rotate(batch_size => 100, force => true) LIMIT 1")
for _ in $(seq 1 600); do [ "$(q "SELECT rows_done > 0 FROM ekm.rotation_job WHERE job_id = $job2")" = t ] && break; sleep 0.05; done
check_match "a second rotation is cancelled mid-way" "$(q "SELECT ekm_rotation_cancel($job2)")" "running -> cancelled"
cpsql "$dir" "$port" -d postgres -q -c "ALTER SYSTEM RESET ekm.rotation_batch_pause" -c "SELECT pg_reload_conf()" >/dev/null
split=$(q "SELECT count(*) FILTER (WHERE ekm_key_id(email) = (SELECT to_key FROM ekm.rotation_job WHERE job_id = $job2)) || ':' || count(*) FROM people")
check_match "its values are split between the two keys" "$split" '^[1-9][0-9]*:20000$'
check "they all decrypt" "$(q "SELECT count(*) FROM people WHERE ekm_decrypt(email, 'public.people.email') = email_shadow AND ekm_decrypt(mobno) = mobno_shadow")" 20000
audit_before=$(q "SELECT md5(string_agg(id || event || coalesce(key_id, '') || detail::text, ',' ORDER BY id)) || ':' || count(*) FROM ekm.audit_log")
keys_before=$(q "SELECT string_agg(key_id || ':' || rotation_status, ',' ORDER BY key_id) FROM ekm.keys")
cluster_stop "$dir"

# 3. The new library, before ALTER EXTENSION UPDATE.
if install_new; then installed_old=0; ok "ekm $NEW installs over $OLD"; else not_ok "ekm $NEW installs over $OLD"; fi
cluster_restart_only "$dir"
check "the objects are still $OLD" "$(q "SELECT extversion FROM pg_extension WHERE extname = 'ekm'")" "$OLD"
check "decryption works meanwhile" "$(q "SELECT count(*) FROM people WHERE ekm_decrypt(email, 'public.people.email') = email_shadow")" 20000
check "so does encryption" "$(q "SELECT ekm_decrypt(ekm_encrypt('x', 'c'), 'c')")" x
check_match "key management refuses with a hint to update" \
  "$(cpsql "$dir" "$port" -d app -At -q -c "SELECT ekm_create_key()" 2>&1 | tr '\n' ' ')" \
  "ERROR:  ekm's objects in this database are version $OLD, but the loaded ekm library is version $NEW HINT:  run ALTER EXTENSION ekm UPDATE"
check_match "so does a rotation" "$(qerr "SELECT * FROM ekm_rotate(dry_run => true)")" "^ERROR:  55000: ekm's objects in this database are version $OLD"
if [ "$OLD" = 0.1.0 ]; then
  # 0.2.0 changed these two functions' arguments and result (new C symbols)
  check_match "a function whose arguments changed is not reached through its old definition" \
    "$(qerr "SELECT * FROM ekm_cleanup_old_keys(0, true)")" '^ERROR:  42883: could not find function "ekm_cleanup_old_keys_wrapper"'
  check_match "nor one whose result changed" "$(qerr "SELECT * FROM ekm_key_status()")" '^ERROR:  42883: could not find function "ekm_key_status_wrapper"'
else
  check_match "cleanup refuses too" "$(qerr "SELECT * FROM ekm_cleanup_old_keys(0, true)")" "^ERROR:  55000: ekm's objects in this database are version $OLD"
  check_match "so does key status" "$(qerr "SELECT * FROM ekm_key_status()")" "^ERROR:  55000: ekm's objects in this database are version $OLD"
fi
for _ in $(seq 1 100); do grep -q 'no job runs in this database until ALTER EXTENSION ekm UPDATE' "$dir/server.log" && break; sleep 0.1; done
check_match "the launcher logs that it starts no job there until the update" \
  "$(grep -c "ekm: no job runs in this database until ALTER EXTENSION ekm UPDATE: ekm's objects in this database are version $OLD, but the loaded ekm library is version $NEW" "$dir/server.log")" '^[1-9]'
check_log_clean "$dir/server.log"

# 4. ALTER EXTENSION UPDATE, and the same objects as a fresh install.
check "ALTER EXTENSION ekm UPDATE" "$(q "ALTER EXTENSION ekm UPDATE" && q "SELECT extversion FROM pg_extension WHERE extname = 'ekm'")" "$NEW"
cpsql "$dir" "$port" -d postgres -q -c "CREATE DATABASE fresh" >/dev/null
cpsql "$dir" "$port" -d fresh -q -c "CREATE EXTENSION ekm" >/dev/null
cpsql "$dir" "$port" -d app -At -q -f "$here/../upgrade/catalog.sql" >"$dir.updated.txt" 2>&1
cpsql "$dir" "$port" -d fresh -At -q -f "$here/../upgrade/catalog.sql" >"$dir.fresh.txt" 2>&1
check_match "the catalog listing has objects" "$(grep -c '^member ' "$dir.fresh.txt")" '^[1-9][0-9]+$'
if grep -q '^member ' "$dir.fresh.txt" && diff -u "$dir.fresh.txt" "$dir.updated.txt" >"$dir.catalog.diff"; then
  ok "the updated database has exactly the objects of a fresh $NEW install (definitions, columns, constraints, indexes, triggers, views, privileges, config tables)"
else
  head -n 60 "$dir.catalog.diff"; not_ok "the updated database has exactly the objects of a fresh $NEW install"
fi

# 5. The data and the jobs.
check "every old value decrypts" "$(q "SELECT count(*) FROM people WHERE ekm_decrypt(email, 'public.people.email') = email_shadow AND ekm_decrypt(mobno) = mobno_shadow")" 20000
check "the keys are as they were" "$(q "SELECT string_agg(key_id || ':' || rotation_status, ',' ORDER BY key_id) FROM ekm.keys")" "$keys_before"
check "the audit log is intact" "$(q "SELECT md5(string_agg(id || event || coalesce(key_id, '') || detail::text, ',' ORDER BY id)) || ':' || count(*) FROM ekm.audit_log WHERE id <= ${audit_before##*:}")" "$audit_before"
check_match "the cancelled job resumes" "$(q "SELECT ekm_rotation_resume($job2)")" "cancelled -> running"
check "and finishes" "$(wait_job "$job2")" done
check "every value is on the active key and decrypts" \
  "$(q "SELECT count(*) FROM people WHERE ekm_key_id(email) = (SELECT key_id FROM ekm.keys WHERE is_active) AND ekm_decrypt(email, 'public.people.email') = email_shadow AND ekm_decrypt(mobno) = mobno_shadow")" 20000
job3=$(q "SELECT job_id FROM ekm_rotate(force => true) LIMIT 1")
check "a new rotation runs after the update" "$(wait_job "$job3")" done
check "the registered columns are listed" "$(q "SELECT count(DISTINCT column_name) FROM ekm.registered_columns")" 2

# 6. A pg_dump of the updated database restores into a fresh cluster of
#    this version with the same master key, and decrypts.
dump=$dir.dump
if as_pg "$PGBIN/pg_dump" -h "$dir" -p "$port" -U postgres -Fc -f "$dump" app 2>"$dir.dump.err"; then
  ok "pg_dump of the updated database"
else
  cat "$dir.dump.err"; not_ok "pg_dump of the updated database"
fi
mkdir -p "$dir2.key"; cp "$dir/data/ekm_dev_master.key" "$dir2.key/master.key"; chmod 600 "$dir2.key/master.key"
[ "$(id -u)" -eq 0 ] && chown -R "$EKM_PG_USER" "$dir2.key"
cluster_start "$dir2" "$port2" "ekm.master_key_file = '$dir2.key/master.key'" || exit 1
cpsql "$dir2" "$port2" -d postgres -q -c "CREATE DATABASE app" >/dev/null
cpsql "$dir2" "$port2" -d app -q -c "CREATE EXTENSION ekm" >/dev/null
as_pg "$PGBIN/pg_restore" -h "$dir2" -p "$port2" -U postgres -d app "$dump" >"$dir.restore.log" 2>&1
check "pg_restore into a fresh $NEW database reports no error" "$(grep -c 'error' "$dir.restore.log")" 0
check "every restored value decrypts" \
  "$(cpsql "$dir2" "$port2" -d app -At -q -c "SELECT count(*) FROM people WHERE ekm_decrypt(email, 'public.people.email') = email_shadow AND ekm_decrypt(mobno) = mobno_shadow" 2>&1)" 20000
check_log_clean "$dir/server.log"
check_log_clean "$dir2/server.log"
cluster_stop "$dir2"; cluster_stop "$dir"
tap_done
