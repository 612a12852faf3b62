#!/usr/bin/env bash
# Rotation never strands a value (issue 11), against a real cluster, with
# the worker held at named protocol steps where an interleaving matters
# (ekm.debug_pause_points; pause.sh): a partitioned table under concurrent
# writers with a partition attached during the rotation, an inheritance
# parent with a larger child, a value that cannot be moved among 10,000
# (needs_attention, then fixed and resumed), a copy made through an imported
# snapshot, and a copy of a row the passes had to skip. ROWS (default
# 100000) sets the size of the partitioned table.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib.sh"
source "$here/tap.sh"
dir=/tmp/ekm-strand; port=61442
source "$here/pause.sh"
ROWS=${ROWS:-100000}
writer_pids=()
cleanup() {
  rm -f "$dir/writers.on"
  for p in "${writer_pids[@]}"; do kill "$p" 2>/dev/null; done
  cluster_stop "$dir" immediate >/dev/null 2>&1 || true
}
trap cleanup EXIT
cluster_start "$dir" "$port" "ekm.debug_pause_points = on" "ekm.rotation_retry_pause = 100" || exit 1
q() { cpsql "$dir" "$port" -d app -At -q -c "$1" 2>&1; }
wait_job() { cpsql "$dir" "$port" -d app -At -q -c "SELECT state FROM ekm_rotation_wait($1, $2)" 2>/dev/null; }
active() { q "SELECT key_id FROM ekm.keys WHERE is_active"; }
q_pg() { cpsql "$dir" "$port" -d postgres -At -q -c "$1" 2>&1; }
q_pg "CREATE DATABASE app" >/dev/null
q "CREATE EXTENSION ekm" >/dev/null

# 1. A partitioned table (3 partitions) under concurrent writers; a fourth
#    partition with values on the old key is attached while the rotation
#    runs (held at its first check). Every partition is moved, the job
#    finishes, and the plaintext shadow is intact.
q "CREATE TABLE orders (id int, region text, card text, card_shadow text, PRIMARY KEY (region, id)) PARTITION BY LIST (region);
   CREATE TABLE orders_eu PARTITION OF orders FOR VALUES IN ('eu');
   CREATE TABLE orders_us PARTITION OF orders FOR VALUES IN ('us');
   CREATE TABLE orders_in PARTITION OF orders FOR VALUES IN ('in');
   INSERT INTO orders SELECT g, (ARRAY['eu', 'us', 'in'])[g % 3 + 1], ekm_encrypt('card-' || g, 'public.orders.card'), 'card-' || g
   FROM generate_series(1, $ROWS) g;
   CREATE TABLE orders_jp (LIKE orders INCLUDING ALL);
   INSERT INTO orders_jp SELECT g, 'jp', ekm_encrypt('card-jp-' || g, 'public.orders.card'), 'card-jp-' || g FROM generate_series(1, 1000) g" >/dev/null
q "VACUUM ANALYZE orders, orders_jp" >/dev/null
check "registering a partitioned table registers its partitions with its context" \
  "$(q "SELECT ekm_register_column('orders', 'card', 'public.orders.card')"; q "SELECT string_agg(tbl::text || ':' || coalesce(parent::text, '-') || ':' || context, ',' ORDER BY tbl::text) FROM ekm.registered_column")" \
  "registered orders.card
orders:-:public.orders.card,orders_eu:orders:public.orders.card,orders_in:orders:public.orders.card,orders_us:orders:public.orders.card"
check_match "a partition is unregistered with its table" "$(cpsql "$dir" "$port" -d app -At -q -c "SELECT ekm_unregister_column('orders_eu', 'card')" 2>&1)" 'column "card" of orders_eu is registered as a partition of (public\.)?orders'
old=$(active)
# each writer counts its committed transactions in writer_tx, in the same transaction
q "CREATE TABLE writer_tx (w int PRIMARY KEY, n bigint NOT NULL); INSERT INTO writer_tx VALUES (1, 0), (2, 0)" >/dev/null
committed() { q "SELECT sum(n) FROM writer_tx"; }
writer() { # region seed
  local i=0 sql
  while [ -f "$dir/writers.on" ] && [ $i -lt 100000 ]; do
    sql=""
    for _ in 1 2 3 4 5; do
      id=$(( (RANDOM * 32768 + RANDOM) % ROWS + 1 ))
      sql+="UPDATE orders SET card = ekm_encrypt('w$2-$i', 'public.orders.card'), card_shadow = 'w$2-$i' WHERE id = $id;"
      i=$((i + 1))
    done
    sql+="INSERT INTO orders VALUES ($ROWS + $2 * 1000000 + $i, '$1', ekm_encrypt('n$2-$i', 'public.orders.card'), 'n$2-$i');"
    sql+="DELETE FROM orders WHERE id = $(( (RANDOM * 32768 + RANDOM) % ROWS + 1 ));"
    sql+="UPDATE writer_tx SET n = n + 1 WHERE w = $2;"
    printf 'BEGIN;%sCOMMIT;\n' "$sql"
  done | cpsql "$dir" "$port" -d app -q >/dev/null 2>"$dir/writer$2.err" 11>&- 12>&- 13>&- 14>&-
}
touch "$dir/writers.on"
writer eu 1 & writer_pids+=($!)
writer in 2 & writer_pids+=($!)
# held at the end of the first partition's pass: the job is running, with
# values moved, and the writers are seen committing while it is
pause_hold app pass_end
pause_also check
tx0=$(committed)
job=$(q "SELECT job_id FROM ekm_rotate(batch_size => 1000, force => true) LIMIT 1")
cpsql "$dir" "$port" -d app -At -q -c "SET client_min_messages = notice" -c "SELECT state FROM ekm_rotation_wait($job, 600)" >"$dir/wait.out" 2>&1 11>&- 12>&- 13>&- 14>&- &
waiter=$!
check "the worker reaches the end of a partition's pass" "$(paused_at app pass_end)" yes
check_match "there the job is running, with values moved" "$(q "SELECT state || ':' || (rows_done > 0) FROM ekm.rotation_job WHERE job_id = $job")" '^running:true$'
txa=$(committed)
for _ in $(seq 1 600); do [ "$(committed)" -gt $((txa + 5)) ] && break; sleep 0.05; done
txb=$(committed)
check_match "the writers commit while the job runs ($txa -> $txb, job $(q "SELECT state FROM ekm.rotation_job WHERE job_id = $job"))" \
  "$((txb - txa)):$(q "SELECT state FROM ekm.rotation_job WHERE job_id = $job")" '^([6-9]|[1-9][0-9]+):running$'
pause_let pass_end
check "the worker reaches its first check (the passes are over)" "$(paused_at app check)" yes
check "a partition is attached during the rotation" "$(q "ALTER TABLE orders ATTACH PARTITION orders_jp FOR VALUES IN ('jp')" && echo attached)" attached
pause_release
state=$(wait_job "$job" 600)
tx1=$(committed)
rm -f "$dir/writers.on"; for p in "${writer_pids[@]}"; do wait "$p"; done; writer_pids=()
wait "$waiter"
check "the rotation of the partitioned table finishes" "$state" done
check_match "the writers committed transactions while it ran ($((tx1 - tx0)))" "$((tx1 - tx0))" '^[1-9][0-9]*$'
check "the writers saw no error" "$(cat "$dir"/writer*.err | grep -cE 'ERROR|FATAL|error:')" 0
check "no write lost: every row decrypts to what was last written" \
  "$(q "SELECT count(*) FILTER (WHERE ekm_decrypt(card, 'public.orders.card') = card_shadow) = count(*) FROM orders")" t
check "every value of every partition, the attached one too, is on the new key" \
  "$(q "SELECT count(*) FILTER (WHERE ekm_key_id(card) = '$(active)') || '/' || count(*) FROM orders")" "$(q "SELECT count(*) || '/' || count(*) FROM orders")"
check "the attached partition was registered by the rotation" "$(q "SELECT parent::text FROM ekm.registered_column WHERE tbl = 'orders_jp'::regclass")" orders
check "ekm.rotation_progress shows one row per partition" \
  "$(q "SELECT string_agg(table_name::text, ',' ORDER BY table_name::text) FROM ekm.rotation_progress WHERE job_id = $job")" "orders_eu,orders_in,orders_jp,orders_us"
check "few passes (it used to loop forever)" "$(q "SELECT max(passes) <= 5 FROM ekm.rotation_cursor WHERE job_id = $job")" t
check "the old key is retired" "$(q "SELECT rotation_status FROM ekm.keys WHERE key_id = '$old'")" retired
pcts=$(grep -oE '[0-9]+% of the job done' "$dir/wait.out" | grep -oE '^[0-9]+')
check_match "the wait printed progress lines ($(printf '%s' "$pcts" | wc -w))" "$(printf '%s\n' $pcts | wc -l)" '^([2-9]|[1-9][0-9]+)$'
check "the wait's progress lines only go up" "$(printf '%s\n' $pcts | sort -n -c 2>/dev/null && echo monotonic)" monotonic
check "the detached partition keeps its registration" \
  "$(q "ALTER TABLE orders DETACH PARTITION orders_jp"; q "SELECT count(*) FROM ekm.registered_column WHERE tbl = 'orders_jp'::regclass")" 1
job=$(q "SELECT job_id FROM ekm_rotate(force => true) LIMIT 1")
check "and is still rotated with it" "$(wait_job "$job" 300):$(q "SELECT count(*) FILTER (WHERE ekm_key_id(card) = '$(active)') = count(*) FROM orders_jp")" done:t
q "DROP TABLE orders_jp" >/dev/null
check "a dropped partition's registration is forgotten at the next job" \
  "$(j=$(q "SELECT job_id FROM ekm_rotate(force => true) LIMIT 1"); wait_job "$j" 300):$(q "SELECT count(*) FROM ekm.registered_column WHERE tbl::oid NOT IN (SELECT oid FROM pg_class)")" done:0

# Two levels: a partition that is itself partitioned, attached after the
# registration. Its leaves are registered under the top table at the next
# job and rotated with it.
q "CREATE TABLE orders_apac (LIKE orders INCLUDING ALL) PARTITION BY LIST (region);
   CREATE TABLE orders_au PARTITION OF orders_apac FOR VALUES IN ('au');
   CREATE TABLE orders_nz PARTITION OF orders_apac FOR VALUES IN ('nz');
   INSERT INTO orders_apac SELECT g, (ARRAY['au', 'nz'])[g % 2 + 1], ekm_encrypt('card-apac-' || g, 'public.orders.card'), 'card-apac-' || g FROM generate_series(1, 2000) g;
   ALTER TABLE orders ATTACH PARTITION orders_apac FOR VALUES IN ('au', 'nz')" >/dev/null
job=$(q "SELECT job_id FROM ekm_rotate(force => true) LIMIT 1")
check "a rotation after a two-level partition was attached finishes" "$(wait_job "$job" 300)" done
check "its partitions, at both levels, are registered under the top table" \
  "$(q "SELECT string_agg(tbl::text || ':' || parent::text, ',' ORDER BY tbl::text) FROM ekm.registered_column WHERE tbl::text IN ('orders_apac', 'orders_au', 'orders_nz')")" \
  "orders_apac:orders,orders_au:orders,orders_nz:orders"
check "and every value in them is on the new key and decrypts" \
  "$(q "SELECT count(*) FILTER (WHERE ekm_key_id(card) = '$(active)' AND ekm_decrypt(card, 'public.orders.card') = card_shadow) FROM orders_apac")" 2000

# 2. Inheritance: a parent smaller than its child. Every row of both moves
#    (the parent's batches used to stop at the parent's size).
q "CREATE TABLE legacy (id int, v text); CREATE TABLE legacy_child (extra int) INHERITS (legacy);
   INSERT INTO legacy SELECT g, ekm_encrypt('l' || g) FROM generate_series(1, 10) g;
   INSERT INTO legacy_child SELECT g, ekm_encrypt('c' || g), g FROM generate_series(11, 20000) g;
   SELECT ekm_register_column('legacy', 'v')" >/dev/null
job=$(q "SELECT job_id FROM ekm_rotate(force => true) LIMIT 1")
check "an inheritance parent and its child rotate" "$(wait_job "$job" 300)" done
check "every row of both is on the new key and decrypts" \
  "$(q "SELECT count(*) FILTER (WHERE ekm_key_id(v) = '$(active)' AND ekm_decrypt(v) = CASE WHEN id <= 10 THEN 'l' ELSE 'c' END || id) FROM legacy")" 20000
check "in few passes" "$(q "SELECT max(passes) <= 2 FROM ekm.rotation_cursor WHERE job_id = $job")" t

# 3. A value that cannot be moved (encrypted with another context) among
#    10,000: the job does not fail at it. It moves the rest, records the
#    row, ends needs_attention with the old key still rotating; once the row
#    is fixed, resume retires the key.
q "CREATE TABLE pv (id int PRIMARY KEY, v text);
   INSERT INTO pv SELECT g, ekm_encrypt('pv' || g, 'public.pv.v') FROM generate_series(1, 10000) g;
   UPDATE pv SET v = ekm_encrypt('pv4242', 'public.other.v') WHERE id = 4242;
   SELECT ekm_register_column('pv', 'v', 'public.pv.v')" >/dev/null
old=$(active)
job=$(q "SELECT job_id FROM ekm_rotate(force => true) LIMIT 1")
check "the job ends needs_attention" "$(wait_job "$job" 300)" needs_attention
check_match "ekm.rotation_problem names the row, its key and why" \
  "$(q "SELECT tbl::text || ' ' || col || ' ' || row_ref || ' ' || (key_id = '$old') || ' ' || reason FROM ekm.rotation_problem WHERE job_id = $job")" \
  "^pv v \(id\)=\(4242\) true does not decrypt with the column's context 'public.pv.v'"
check "every other value moved" "$(q "SELECT count(*) FROM pv WHERE ekm_key_id(v) = '$(active)'")" 9999
check "the old key is still rotating (the value still decrypts with its context)" \
  "$(q "SELECT rotation_status FROM ekm.keys WHERE key_id = '$old'"):$(q "SELECT ekm_decrypt(v, 'public.other.v') FROM pv WHERE id = 4242")" "rotating:pv4242"
check_match "health reports it" "$(q "SELECT status || ': ' || detail FROM ekm_health() WHERE \"check\" = 'rotation_jobs'")" "^failed: job $job needs attention: 1 values could not be moved"
q "UPDATE pv SET v = ekm_encrypt(ekm_decrypt(v, 'public.other.v'), 'public.pv.v') WHERE id = 4242" >/dev/null
check_match "after the fix, resume" "$(q "SELECT ekm_rotation_resume($job)")" "needs_attention -> running"
check "the job finishes" "$(wait_job "$job" 300)" done
check "the old key is retired, the problem list is empty" \
  "$(q "SELECT rotation_status FROM ekm.keys WHERE key_id = '$old'"):$(q "SELECT count(*) FROM ekm.rotation_problem WHERE job_id = $job")" retired:0

# 4. An imported snapshot: a session that starts after the fence imports the
#    snapshot of a transaction from before the passes and copies the old
#    values it sees. The fence waits for it (its snapshot is older), then the
#    check finds the copies and moves them.
q "CREATE TABLE pv_copy (id int PRIMARY KEY, v text); SELECT ekm_register_column('pv_copy', 'v', 'public.pv.v')" >/dev/null
old=$(active)
session_start 11 s1
session_send 11 "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM pv; SELECT 'snapshot', pg_export_snapshot();"
snap=$(session_line s1 '^snapshot' | cut -d'|' -f2)
pause_hold app fence
job=$(q "SELECT job_id FROM ekm_rotate(force => true) LIMIT 1")
check "the worker took its fence (after a clean check)" "$(paused_at app fence)" yes
check "the passes moved every value" "$(q "SELECT count(*) FROM pv WHERE ekm_key_id(v) = '$(active)'")" 10000
session_start 12 s2
session_send 12 "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT '$snap'; INSERT INTO pv_copy SELECT id, v FROM pv WHERE id <= 100; SELECT 'copied', count(*) FROM pv_copy WHERE ekm_key_id(v) = '$old';"
check "a session started after the fence copied old-key values through the imported snapshot" "$(session_line s2 '^copied')" "copied|100"
session_send 11 "COMMIT;"; session_end 11 s1
pause_release
waiting_for() {
  for _ in $(seq 1 600); do
    w=$(q "SELECT waiting_for FROM ekm.rotation_job WHERE job_id = $job")
    [[ "$w" == $1* ]] && { echo "$w"; return; }
    sleep 0.05
  done
  echo "$w"
}
check_match "the job waits for the session holding the old snapshot" "$(waiting_for "1 sessions holding a snapshot")" '^1 sessions holding a snapshot from before the last pass ended \(pids [0-9]+\)'
check "the old key is still rotating" "$(q "SELECT rotation_status FROM ekm.keys WHERE key_id = '$old'")" rotating
session_send 12 "COMMIT;"; session_end 12 s2
check "when it commits the job moves the copies and finishes" "$(wait_job "$job" 300)" done
check "every copy is on the new key and decrypts" \
  "$(q "SELECT count(*) FROM pv_copy WHERE ekm_key_id(v) = '$(active)' AND ekm_decrypt(v, 'public.pv.v') = 'pv' || id")" 100

# 5. A row the passes skip (an application holds it) is copied by a
#    transaction, then overwritten: the fence is only taken once a check
#    finds nothing left, so the copier is waited for and its copy moved.
q "TRUNCATE pv_copy" >/dev/null
old=$(active)
session_start 11 locker
session_send 11 "BEGIN; SELECT 'locked', id FROM pv WHERE id = 5 FOR UPDATE;"
session_line locker '^locked' >/dev/null
job=$(q "SELECT job_id FROM ekm_rotate(force => true) LIMIT 1")
for _ in $(seq 1 600); do [ "$(q "SELECT max(passes) FROM ekm.rotation_cursor WHERE job_id = $job AND tbl = 'pv'::regclass")" -ge 2 ] && break; sleep 0.05; done
check "the check found the skipped row and sent the column back" "$(q "SELECT max(passes) >= 2 FROM ekm.rotation_cursor WHERE job_id = $job AND tbl = 'pv'::regclass")" t
pause_hold app check
check "the worker is held at its next check" "$(paused_at app check)" yes
check "no fence was taken while the row was left" "$(q "SELECT waiting_for IS NULL AND state = 'running' FROM ekm.rotation_job WHERE job_id = $job")" t
session_start 12 copier
session_send 12 "BEGIN; INSERT INTO pv_copy SELECT id, v FROM pv WHERE id = 5; SELECT 'copied', ekm_key_id(v) = '$old' FROM pv_copy;"
check "a transaction copied the skipped row's old value" "$(session_line copier '^copied')" "copied|t"
session_send 11 "UPDATE pv SET v = ekm_encrypt('pv5-new', 'public.pv.v') WHERE id = 5; COMMIT;"; session_end 11 locker
pause_release
check_match "the fence waits for the copier" "$(waiting_for "1 transactions")" '^1 transactions that were running when the last pass ended'
session_send 12 "COMMIT;"; session_end 12 copier
check "the job finishes after moving the copy" "$(wait_job "$job" 300)" done
check "the copy is on the new key and decrypts to the value it copied" \
  "$(q "SELECT ekm_key_id(v) = '$(active)' AND ekm_decrypt(v, 'public.pv.v') = 'pv5' FROM pv_copy WHERE id = 5")" t
# 6. Ciphertext outside registered columns: an AFTER UPDATE audit trigger
#    on a registered table records the rotation's OLD values (every one on
#    the old key) in an unregistered table, and copies sit inside a jsonb
#    column. Cleanup keeps the old key until a scan of the database that
#    started after its retirement finds no value on it anywhere; the scan
#    finds both, health warns, and once they are dealt with the key goes.
q "CREATE TABLE acct (id int PRIMARY KEY, ssn text); CREATE TABLE acct_audit (id int, old_ssn text); CREATE TABLE acct_notes (id int, note jsonb);
   CREATE FUNCTION acct_audit_fn() RETURNS trigger LANGUAGE plpgsql AS \$\$ BEGIN INSERT INTO acct_audit VALUES (OLD.id, OLD.ssn); RETURN NEW; END \$\$;
   CREATE TRIGGER acct_audit AFTER UPDATE ON acct FOR EACH ROW EXECUTE FUNCTION acct_audit_fn();
   INSERT INTO acct SELECT g, ekm_encrypt('ssn-' || g, 'public.acct.ssn') FROM generate_series(1, 500) g;
   INSERT INTO acct_notes SELECT id, jsonb_build_object('ssn', ssn, 'n', id) FROM acct WHERE id <= 20;
   SELECT ekm_register_column('acct', 'ssn', 'public.acct.ssn')" >/dev/null
k1=$(active)
job=$(q "SELECT job_id FROM ekm_rotate(force => true) LIMIT 1")
# the batches run as acct's owner, security-restricted, and the trigger's
# unqualified table name is found on the owner's login
# search_path, as it is for the application (ekm.batch_search_path can
# force pg_catalog, pg_temp instead: t_shapes.sh, phase 3)
check "the application's audit trigger with an unqualified name runs in the batches: the job finishes" "$(wait_job "$job" 300)" done
check "every value decrypts" "$(q "SELECT count(*) FROM acct WHERE ekm_decrypt(ssn, 'public.acct.ssn') = 'ssn-' || id")" 500
check "the audit trigger recorded every old value, on the now retired key" \
  "$(q "SELECT count(*) FROM acct_audit WHERE ekm_key_id(old_ssn) = '$k1'"):$(q "SELECT rotation_status FROM ekm.keys WHERE key_id = '$k1'")" "500:retired"
check_match "cleanup keeps the key: no scan of the database since it was retired" \
  "$(q "SELECT action FROM ekm_cleanup_old_keys(0, dry_run => true) WHERE key_id = '$k1'")" '^kept: no scan of the database has run since it was retired'
scan=$(q "SELECT job_id FROM ekm_scan_database()")
check "ekm_scan_database() runs as a background job" "$(wait_job "$scan" 300)" done
check "it finds the values in every column, registered or not, inside json too" \
  "$(q "SELECT string_agg(table_name::text || '.' || column_name || ':' || registered || ':' || (key_id = '$k1') || ':' || values, ',' ORDER BY table_name::text, column_name::text) FROM ekm.ciphertext_locations WHERE table_name::text LIKE 'acct%'")" \
  "acct.ssn:true:false:500,acct_audit.old_ssn:false:true:500,acct_notes.note:false:true:20"
check_match "health warns about them" "$(q "SELECT status || ': ' || detail FROM ekm_health() WHERE \"check\" = 'unregistered_ciphertexts'")" \
  '^warning: the scan of .* found ekm ciphertexts in columns that are not registered: (public\.)?acct_audit.old_ssn: 500 values, (public\.)?acct_notes.note: 20 values'
check_match "cleanup keeps the key and says where its values are" \
  "$(q "SELECT action FROM ekm_cleanup_old_keys(0) WHERE key_id = '$k1'" 2>&1)" 'kept: the scan of the database finished .* found values on it in (public\.)?acct_audit.old_ssn: 500, (public\.)?acct_notes.note: 20'
check "the key was kept" "$(q "SELECT rotation_status FROM ekm.keys WHERE key_id = '$k1'")" retired
check_match "force would destroy it anyway (with a warning and an audit entry)" \
  "$(q "SELECT action FROM ekm_cleanup_old_keys(0, dry_run => true, force => true) WHERE key_id = '$k1'")" '^would destroy \(forced: the scan of the database'
# dealt with: the notes' copies go; the audit column is registered (its
# values are bound to acct's context); the old key is reopened and a
# rotation moves everything on it to a new key
q "DELETE FROM acct_notes; SELECT ekm_register_column('acct_audit', 'old_ssn', 'public.acct.ssn'); SELECT ekm_activate_key('$k1')" >/dev/null
job=$(q "SELECT job_id FROM ekm_rotate(force => true) LIMIT 1")
check "the rotation after reopening the key finishes" "$(wait_job "$job" 300)" done
scan=$(q "SELECT job_id FROM ekm_scan_database()")
check "a new scan finishes" "$(wait_job "$scan" 300)" done
check "health has nothing to say" "$(q "SELECT status FROM ekm_health() WHERE \"check\" = 'unregistered_ciphertexts'")" ok
check "cleanup now destroys the old key" "$(q "SELECT action FROM ekm_cleanup_old_keys(0) WHERE key_id = '$k1'" 2>&1)" destroyed
check "every audit value decrypts to what acct held" \
  "$(q "SELECT count(*) FILTER (WHERE ekm_decrypt(old_ssn, 'public.acct.ssn') = 'ssn-' || id) = count(*) FROM acct_audit")" t
check "after ekm_cleanup_old_keys(0) every value still decrypts" \
  "$(q "SELECT count(*) FROM ekm_cleanup_old_keys(0) WHERE action = 'destroyed'" >/dev/null; q "SELECT (SELECT count(*) FROM orders WHERE ekm_decrypt(card, 'public.orders.card') = card_shadow) = (SELECT count(*) FROM orders) AND (SELECT count(*) FROM pv WHERE ekm_decrypt(v, 'public.pv.v') IS NOT NULL) = 10000 AND (SELECT count(*) FROM pv_copy WHERE ekm_decrypt(v, 'public.pv.v') IS NOT NULL) = 1")" t
check_log_clean "$dir/server.log"
tap_done
