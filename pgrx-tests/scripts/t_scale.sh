#!/usr/bin/env bash
# Rotation at production scale (docs/design.md, section 5, "Pace"):
#   1. the heap bound: a rotation, a rollback and a column encryption of a
#      200,000-row table grow it by at most 5% (ekm.rotation_vacuum_growth);
#      without the vacuum the same rotation doubles it (the control);
#      a table of TOASTed values too; sizes in ekm.rotation_progress and in
#      the job's audit entry; SELECT ekm_rotation_wait() itself holds no
#      space back;
#   2. a snapshot held across the rotation: the vacuum cannot free, and
#      ekm.rotation_progress.vacuum_note names the session;
#   3. the throttle on active sessions: throttled_by says so while more
#      client sessions than ekm.rotation_max_active_sessions run a
#      statement, the job does not advance, and it finishes once they end;
#   4. the adaptive pause on an idle server: nothing to protect, no pause;
#   5. two workers (ekm.rotation_workers = 2) on a partitioned table under
#      writers: while one worker is held inside a batch of one partition the
#      other finishes the rest; the held one is killed there (SIGKILL: the
#      server restarts), the job resumes and finishes, and every row holds
#      what its last writer wrote, on the new key;
#   6. two workers on block ranges of one (unpartitioned) table under
#      writers: each held inside a batch of its own range, one killed there,
#      the job resumes and finishes, nothing lost.
# The replica lag throttle is in t_standby.sh (it needs a standby).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib.sh"
source "$here/tap.sh"
dir=/tmp/ekm-scale; port=61455
cleanup() {
  [ -n "${held_pid:-}" ] && kill "$held_pid" 2>/dev/null
  for p in ${blocked_pids:-}; do kill "$p" 2>/dev/null; done
  [ -n "${lock_pid:-}" ] && kill "$lock_pid" 2>/dev/null
  cluster_stop "$dir" immediate >/dev/null 2>&1
}
trap cleanup EXIT
cluster_start "$dir" "$port" "ekm.debug_pause_points = on" || exit 1
q() { cpsql "$dir" "$port" -d app -At -q -c "$1" 2>&1; }
# a job's final state; its NOTICE lines are not part of the answer
wait_job() { cpsql "$dir" "$port" -d app -At -q -c "SELECT state FROM ekm_rotation_wait($1, 300)" 2>/dev/null; }
job_of() { q "SELECT max(job_id) FROM ekm.rotation_job"; }
reload() { q "SELECT pg_reload_conf()" >/dev/null; q "SELECT pg_sleep(0.2)" >/dev/null; }
# heap + TOAST (table and index) + the indexes on the encrypted columns
size_of() {
  q "SELECT pg_relation_size('$1') + coalesce(pg_total_relation_size(nullif(reltoastrelid, 0)), 0) FROM pg_class WHERE oid = '$1'::regclass"
}
growth_pct() { python3 -c "print(round(100.0 * ($2 - $1) / $1, 1))"; }
within() { python3 -c "import sys; sys.exit(0 if $1 <= $2 else 1)"; }

cpsql "$dir" "$port" -d postgres -q -c "CREATE DATABASE app" || exit 1
q "CREATE EXTENSION ekm" >/dev/null
q "CREATE TABLE people (id int PRIMARY KEY, email text, ssn text)" >/dev/null
q "INSERT INTO people SELECT g, ekm_encrypt('user' || g || '@example.com', 'people.email'), ekm_encrypt(lpad(g::text, 9, '0'), 'people.ssn') FROM generate_series(1, 200000) g" >/dev/null
q "VACUUM ANALYZE people" >/dev/null
q "SELECT ekm_register_column('people', 'email', 'people.email'), ekm_register_column('people', 'ssn', 'people.ssn')" >/dev/null
q "CREATE TABLE shadow AS SELECT id, ekm_decrypt(email, 'people.email') AS email, ekm_decrypt(ssn, 'people.ssn') AS ssn FROM people" >/dev/null
same_as_shadow() {
  q "SELECT count(*) FROM people p JOIN shadow s USING (id) WHERE ekm_decrypt(p.email, 'people.email') = s.email AND ekm_decrypt(p.ssn, 'people.ssn') = s.ssn"
}

# --- 1. the heap bound ------------------------------------------------------
before=$(size_of people)
q "SELECT DISTINCT job_id FROM ekm_rotate(force => true)" >/dev/null
job=$(job_of)
check "1: rotation of 200,000 rows x 2 columns ends done" "$(wait_job "$job")" done
after=$(size_of people)
g=$(growth_pct "$before" "$after")
if within "$g" 5; then ok "1: heap grew $g% (<= 5%): $before -> $after bytes"; else not_ok "1: heap grew $g% (> 5%): $before -> $after bytes"; fi
check "1: every value decrypts to what it was, on the new key" "$(same_as_shadow)" 200000
check "1: no value left on another key" "$(q "SELECT count(*) FROM people WHERE ekm_key_id(email) <> (SELECT key_id FROM ekm.keys WHERE is_active) OR ekm_key_id(ssn) <> (SELECT key_id FROM ekm.keys WHERE is_active)")" 0
check_match "1: the job vacuumed behind its batches" "$(q "SELECT vacuums FROM ekm.rotation_job WHERE job_id = $job")" '^[1-9][0-9]*$'
check "1: progress: size before, now, growth" \
  "$(q "SELECT DISTINCT heap_bytes_before + toast_bytes_before = $before, heap_bytes + toast_bytes = $after, growth_percent = $g, vacuum_note IS NULL FROM ekm.rotation_progress WHERE job_id = $job")" "t|t|t|t"
check "1: the audit entry has the sizes before and after" \
  "$(q "SELECT (detail->>'heap_bytes_before')::bigint + (detail->>'toast_bytes_before')::bigint = $before, (detail->>'heap_bytes_after')::bigint + (detail->>'toast_bytes_after')::bigint = $after, (detail->>'vacuums')::int > 0 FROM ekm.audit_log WHERE event = 'rotation_done' AND detail->>'job_id' = '$job'")" "t|t|t"
check_match "1: the log line has them too" "$(grep "rotate job $job done" "$dir/server.log" | tail -n1)" 'tables [0-9.]+ MB -> [0-9.]+ MB, TOAST .* [0-9]+ vacuums'

# the rollback, over the table as the rotation left it
before=$(size_of people)
q "SELECT * FROM ekm_rollback()" >/dev/null
job=$(job_of)
check "1: rollback ends done" "$(wait_job "$job")" done
after=$(size_of people)
g=$(growth_pct "$before" "$after")
if within "$g" 5; then ok "1: rollback grew the heap $g% (<= 5%)"; else not_ok "1: rollback grew the heap $g% (> 5%)"; fi
check "1: every value decrypts after the rollback" "$(same_as_shadow)" 200000

# the control: the same rotation without the vacuum doubles the table
q "ALTER SYSTEM SET ekm.rotation_vacuum_growth = 0" >/dev/null; reload
before=$(size_of people)
q "SELECT DISTINCT job_id FROM ekm_rotate(force => true)" >/dev/null
job=$(job_of)
check "1: control rotation (ekm.rotation_vacuum_growth = 0) ends done" "$(wait_job "$job")" done
after=$(size_of people)
g=$(growth_pct "$before" "$after")
if within 80 "$g"; then ok "1: without the vacuum the heap grew $g% (the bound is the vacuum's doing)"; else not_ok "1: without the vacuum the heap grew only $g%"; fi
check "1: no vacuum counted" "$(q "SELECT vacuums FROM ekm.rotation_job WHERE job_id = $job")" 0
q "ALTER SYSTEM RESET ekm.rotation_vacuum_growth" >/dev/null; reload
q "VACUUM FULL people" >/dev/null

# TOASTed values: 4,000 rows of ~4.5 kB ciphertexts (out of line)
q "CREATE TABLE docs (id int PRIMARY KEY, body text)" >/dev/null
q "INSERT INTO docs SELECT g, ekm_encrypt(repeat(md5(g::text), 100), 'docs.body') FROM generate_series(1, 4000) g" >/dev/null
q "VACUUM ANALYZE docs" >/dev/null
q "SELECT ekm_register_column('docs', 'body', 'docs.body')" >/dev/null
check "1: docs' values are out of line" "$(q "SELECT pg_relation_size(reltoastrelid) > 10 * pg_relation_size(oid) FROM pg_class WHERE relname = 'docs'")" t
before=$(size_of docs); pbefore=$(size_of people)
q "SELECT DISTINCT job_id FROM ekm_rotate(force => true)" >/dev/null
job=$(job_of)
check "1: rotation of the TOASTed table ends done" "$(wait_job "$job")" done
after=$(size_of docs); pafter=$(size_of people)
g=$(growth_pct "$before" "$after")
if within "$g" 5; then ok "1: heap + TOAST grew $g% (<= 5%): $before -> $after bytes"; else not_ok "1: heap + TOAST grew $g% (> 5%): $before -> $after bytes"; fi
g=$(growth_pct "$pbefore" "$pafter")
if within "$g" 5; then ok "1: people grew $g% in the same job"; else not_ok "1: people grew $g% in the same job"; fi
check "1: docs' values decrypt" "$(q "SELECT count(*) FROM docs WHERE ekm_decrypt(body, 'docs.body') = repeat(md5(id::text), 100)")" 4000
check "1: progress shows TOAST before and now" "$(q "SELECT toast_bytes_before > 0, toast_bytes > 0 FROM ekm.rotation_progress WHERE job_id = $job AND table_name = 'docs'::regclass")" "t|t"

# a column encryption: its values get longer, so the bound is against the
# same rows loaded with their final values (a table without free space)
q "CREATE TABLE plain (id int PRIMARY KEY, secret text)" >/dev/null
q "INSERT INTO plain SELECT g, 'secret-' || g FROM generate_series(1, 200000) g" >/dev/null
q "VACUUM ANALYZE plain" >/dev/null
q "SELECT * FROM ekm_encrypt_column('plain', 'secret', context => 'plain.secret')" >/dev/null
job=$(job_of)
check "1: column encryption of 200,000 rows ends done" "$(wait_job "$job")" done
q "CREATE TABLE plain_packed AS SELECT * FROM plain" >/dev/null
packed=$(size_of plain_packed); after=$(size_of plain)
g=$(growth_pct "$packed" "$after")
if within "$g" 5; then ok "1: the encrypted table is $g% larger than the same rows packed (<= 5%)"; else not_ok "1: the encrypted table is $g% larger than the same rows packed"; fi
check "1: every value encrypted" "$(q "SELECT count(*) FROM plain WHERE ekm_decrypt(secret, 'plain.secret') = 'secret-' || id")" 200000

# --- 2. a snapshot older than the batches ------------------------------------
rm -f "$dir/held.in"; mkfifo "$dir/held.in"
cpsql "$dir" "$port" -d app -At -q <"$dir/held.in" >"$dir/held.out" 2>&1 &
held_pid=$!
exec 9>"$dir/held.in"
echo "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 'held', pg_backend_pid(), count(*) FROM people;" >&9
held=""
for _ in $(seq 1 200); do held=$(grep -m1 '^held|' "$dir/held.out" | cut -d'|' -f2); [ -n "$held" ] && break; sleep 0.05; done
check_match "2: a session holds a snapshot" "$held" '^[0-9]+$'
before=$(size_of people)
q "SELECT DISTINCT job_id FROM ekm_rotate(force => true)" >/dev/null
job=$(job_of)
# the passes end, then the final step waits for that transaction (the fence)
waiting=""
for _ in $(seq 1 1200); do
  waiting=$(q "SELECT waiting_for FROM ekm.rotation_job WHERE job_id = $job")
  [ -n "$waiting" ] && break; sleep 0.05
done
check_match "2: after its passes the job waits for the session" "$waiting" "pids $held"
after=$(size_of people)
g=$(growth_pct "$before" "$after")
if within 50 "$g"; then ok "2: with the snapshot held the heap grew $g% (nothing could be freed)"; else not_ok "2: with the snapshot held the heap grew only $g%"; fi
check_match "2: vacuum_note names the session and says why" \
  "$(q "SELECT DISTINCT vacuum_note FROM ekm.rotation_progress WHERE job_id = $job")" "^session $held \\(postgres, idle in transaction, in a transaction since .*holds a snapshot older than the batches"
echo "COMMIT;" >&9; exec 9>&-; wait "$held_pid" 2>/dev/null; held_pid=""
check "2: the rotation ends done once it commits" "$(wait_job "$job")" done
check "2: every value decrypts" "$(same_as_shadow)" 200000
q "VACUUM FULL people" >/dev/null

# --- 3. the active sessions throttle ------------------------------------------
q "ALTER SYSTEM SET ekm.rotation_max_active_sessions = 1" >/dev/null; reload
# two sessions waiting for a lock are two sessions running a statement
cpsql "$dir" "$port" -d postgres -q -c "SELECT pg_advisory_lock(4242), pg_sleep(600)" >/dev/null 2>&1 &
holder=$!
for _ in $(seq 1 200); do [ "$(q "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 AND granted")" = 1 ] && break; sleep 0.05; done
blocked_pids="$holder"
for i in 1 2; do
  cpsql "$dir" "$port" -d postgres -q -c "SELECT pg_advisory_lock(4242)" >/dev/null 2>&1 &
  blocked_pids="$blocked_pids $!"
done
for _ in $(seq 1 200); do [ "$(q "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 AND NOT granted")" = 2 ] && break; sleep 0.05; done
q "SELECT DISTINCT job_id FROM ekm_rotate(force => true)" >/dev/null
job=$(job_of)
throttled=""
for _ in $(seq 1 200); do
  throttled=$(q "SELECT throttled_by FROM ekm.rotation_job WHERE job_id = $job")
  [ -n "$throttled" ] && break; sleep 0.05
done
check_match "3: throttled_by names the limit" "$throttled" '^active sessions: [3-9] client sessions are running a statement \(ekm.rotation_max_active_sessions = 1\)$'
check "3: throttled_since is set" "$(q "SELECT throttled_since IS NOT NULL AND state = 'running' FROM ekm.rotation_job WHERE job_id = $job")" t
check "3: progress shows it" "$(q "SELECT DISTINCT throttled_by IS NOT NULL FROM ekm.rotation_progress WHERE job_id = $job")" t
r1=$(q "SELECT rows_done FROM ekm.rotation_job WHERE job_id = $job")
q "SELECT pg_sleep(1)" >/dev/null
r2=$(q "SELECT rows_done FROM ekm.rotation_job WHERE job_id = $job")
check "3: no batch runs while throttled" "$r2" "$r1"
q "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query LIKE '%pg_advisory_lock(4242)%' AND pid <> pg_backend_pid()" >/dev/null
wait $blocked_pids 2>/dev/null; blocked_pids=""
check "3: the job finishes once the sessions end" "$(wait_job "$job")" done
check "3: throttled_by is cleared" "$(q "SELECT throttled_by IS NULL AND throttled_since IS NULL FROM ekm.rotation_job WHERE job_id = $job")" t
check_match "3: the log says when the job was throttled" "$(grep "rotation job $job: throttled" "$dir/server.log" | head -n1)" 'throttled: active sessions'
check "3: every value decrypts" "$(same_as_shadow)" 200000
q "ALTER SYSTEM RESET ekm.rotation_max_active_sessions" >/dev/null; reload

# --- 4. the adaptive pause with no application ----------------------------------
q "ALTER SYSTEM SET ekm.rotation_target_app_share = 0.8" >/dev/null; reload
q "SELECT DISTINCT job_id FROM ekm_rotate(force => true)" >/dev/null
job=$(job_of)
check "4: a rotation with a target share on an idle server ends done" "$(wait_job "$job")" done
check "4: it was never throttled (no application to protect)" "$(grep -c "rotation job $job: throttled" "$dir/server.log")" 0
check "4: every value decrypts" "$(same_as_shadow)" 200000
q "ALTER SYSTEM RESET ekm.rotation_target_app_share" >/dev/null; reload

# --- 5. two workers, a partitioned table, writers, a worker killed mid-batch ------
q "CREATE TABLE orders (id int, email text, plain text) PARTITION BY HASH (id)" >/dev/null
for i in 0 1 2 3; do q "CREATE TABLE orders_$i PARTITION OF orders FOR VALUES WITH (MODULUS 4, REMAINDER $i)" >/dev/null; done
q "INSERT INTO orders SELECT g, ekm_encrypt('o' || g, 'orders.email'), 'o' || g FROM generate_series(1, 40000) g" >/dev/null
q "VACUUM ANALYZE orders" >/dev/null
# a trigger of one partition holds a rotation worker inside its batch while
# this script holds advisory lock (4242, 5); the application passes
q "CREATE FUNCTION hold_worker() RETURNS trigger LANGUAGE plpgsql AS \$\$
   BEGIN
     IF (SELECT backend_type FROM pg_catalog.pg_stat_activity WHERE pid = pg_catalog.pg_backend_pid()) LIKE 'ekm rotation%' THEN
       PERFORM pg_catalog.pg_advisory_xact_lock_shared(4242, 5);
     END IF;
     RETURN NEW;
   END \$\$" >/dev/null
q "CREATE TRIGGER hold_worker BEFORE UPDATE ON orders_2 FOR EACH ROW EXECUTE FUNCTION hold_worker()" >/dev/null
q "SELECT ekm_register_column('orders', 'email', 'orders.email')" >/dev/null
q "CREATE PROCEDURE writer(n int) LANGUAGE plpgsql AS \$\$
   DECLARE i int; r int; v text;
   BEGIN
     FOR i IN 1..n LOOP
       r := 1 + floor(random() * 40000)::int; v := 'w' || i || '-' || r;
       UPDATE orders SET email = ekm_encrypt(v, 'orders.email'), plain = v WHERE id = r;
       COMMIT;
     END LOOP;
   END \$\$" >/dev/null
q "ALTER SYSTEM SET ekm.rotation_workers = 2" >/dev/null
q "ALTER SYSTEM SET ekm.rotation_lock_timeout = 600000" >/dev/null
q "ALTER SYSTEM SET deadlock_timeout = '20min'" >/dev/null
reload
rm -f "$dir/lock.in"; mkfifo "$dir/lock.in"
cpsql "$dir" "$port" -d app -At -q <"$dir/lock.in" >"$dir/lock.out" 2>&1 &
lock_pid=$!
exec 8>"$dir/lock.in"
echo "SELECT pg_advisory_lock(4242, 5); SELECT 'held';" >&8
for _ in $(seq 1 200); do grep -q '^held$' "$dir/lock.out" && break; sleep 0.05; done
for w in 1 2; do cpsql "$dir" "$port" -d app -q -c "CALL writer(3000)" >"$dir/writer$w.out" 2>&1 & done
q "SELECT DISTINCT job_id FROM ekm_rotate(batch_size => 500, force => true)" >/dev/null
job=$(job_of)
held=""
for _ in $(seq 1 600); do
  held=$(q "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE a.backend_type LIKE 'ekm rotation%' AND l.locktype = 'advisory' AND l.classid = 4242 AND l.objid = 5 AND NOT l.granted")
  [ -n "$held" ] && break; sleep 0.05
done
check_match "5: a worker is held inside a batch of orders_2" "$held" '^[0-9]+$'
others=""
for _ in $(seq 1 1200); do
  others=$(q "SELECT count(*) FILTER (WHERE state = 'done') || '/' || count(*) FROM ekm.rotation_cursor WHERE job_id = $job AND tbl::text LIKE 'orders\\_%' AND tbl <> 'orders_2'::regclass")
  [ "$others" = 3/3 ] && break; sleep 0.05
done
check "5: meanwhile the other worker finished the three other partitions" "$others" 3/3
check "5: orders_2 is still in its first pass, claimed by the held worker" \
  "$(q "SELECT c.state || ':' || (SELECT count(*) FROM pg_locks l WHERE l.locktype = 'userlock' AND l.objid = 'orders_2'::regclass::oid AND l.objsubid = 4 AND l.pid = $held AND l.granted) FROM ekm.rotation_cursor c WHERE c.job_id = $job AND c.tbl = 'orders_2'::regclass")" "scanning:1"
check "5: two rotation workers ran the job (its own and a helper)" \
  "$(grep -cE "rotation job $job: (worker started|helper started)" "$dir/server.log")" 2
r0=$(crash_restarts "$dir")
kill -KILL "$held"; check "5: the held worker was sent SIGKILL inside its batch" "$?" 0
exec 8>&-; wait "$lock_pid" 2>/dev/null
wait_crash_restart "$dir" "$port" "$r0"
wait 2>/dev/null
# writers again, while the resumed job runs
for w in 1 2; do cpsql "$dir" "$port" -d app -q -c "CALL writer(1000)" >"$dir/writer$w.out" 2>&1 & done
check "5: the job resumes after the restart and ends done" "$(wait_job "$job")" done
wait
check "5: the writers committed without error after the restart" "$(client_errors "$dir/writer1.out" "$dir/writer2.out")" 0
check "5: every row holds what its last writer wrote, on the new key" \
  "$(q "SELECT count(*) FROM orders WHERE ekm_decrypt(email, 'orders.email') = plain AND ekm_key_id(email) = (SELECT to_key FROM ekm.rotation_job WHERE job_id = $job)")" 40000
check "5: the old key is retired after the final check" \
  "$(q "SELECT rotation_status FROM ekm.keys WHERE key_id = (SELECT from_key FROM ekm.rotation_job WHERE job_id = $job)")" retired
q "ALTER SYSTEM RESET ekm.rotation_workers" >/dev/null
q "ALTER SYSTEM RESET ekm.rotation_lock_timeout" >/dev/null
q "ALTER SYSTEM RESET deadlock_timeout" >/dev/null
reload

# --- 6. two workers on block ranges of one table, writers, a worker killed --------
# 60,000 rows in one table; a trigger holds a rotation worker inside a batch
# of a row with id > 45,000 (the top quarter of the table) while this script
# holds advisory lock (4242, 6). The job's worker starts on the table, the
# helper splits the rest of its part and takes the upper half; the job's
# worker finishes the lower half, then splits the helper's range and takes
# its upper half: both are held in batches of the same table, each on a
# block range of its own.
q "CREATE TABLE items (id int PRIMARY KEY, email text, plain text)" >/dev/null
q "INSERT INTO items SELECT g, ekm_encrypt('i' || g, 'items.email'), 'i' || g FROM generate_series(1, 60000) g" >/dev/null
q "VACUUM ANALYZE items" >/dev/null
q "CREATE FUNCTION hold_top() RETURNS trigger LANGUAGE plpgsql AS \$\$
   BEGIN
     IF OLD.id > 45000 AND (SELECT backend_type FROM pg_catalog.pg_stat_activity WHERE pid = pg_catalog.pg_backend_pid()) LIKE 'ekm rotation%' THEN
       PERFORM pg_catalog.pg_advisory_xact_lock_shared(4242, 6);
     END IF;
     RETURN NEW;
   END \$\$" >/dev/null
q "CREATE TRIGGER hold_top BEFORE UPDATE ON items FOR EACH ROW EXECUTE FUNCTION hold_top()" >/dev/null
q "SELECT ekm_register_column('items', 'email', 'items.email')" >/dev/null
q "CREATE PROCEDURE item_writer(n int) LANGUAGE plpgsql AS \$\$
   DECLARE i int; r int; v text;
   BEGIN
     FOR i IN 1..n LOOP
       r := 1 + floor(random() * 60000)::int; v := 'w' || i || '-' || r;
       UPDATE items SET email = ekm_encrypt(v, 'items.email'), plain = v WHERE id = r;
       COMMIT;
     END LOOP;
   END \$\$" >/dev/null
q "ALTER SYSTEM SET ekm.rotation_workers = 2" >/dev/null
q "ALTER SYSTEM SET ekm.rotation_lock_timeout = 600000" >/dev/null
q "ALTER SYSTEM SET deadlock_timeout = '20min'" >/dev/null
reload
rm -f "$dir/lock6.in"; mkfifo "$dir/lock6.in"
cpsql "$dir" "$port" -d app -At -q <"$dir/lock6.in" >"$dir/lock6.out" 2>&1 &
lock_pid=$!
exec 8>"$dir/lock6.in"
echo "SELECT pg_advisory_lock(4242, 6); SELECT 'held';" >&8
for _ in $(seq 1 200); do grep -q '^held$' "$dir/lock6.out" && break; sleep 0.05; done
for w in 1 2; do cpsql "$dir" "$port" -d app -q -c "CALL item_writer(3000)" >"$dir/writer$w.out" 2>&1 & done
q "SELECT DISTINCT job_id FROM ekm_rotate(batch_size => 500, force => true)" >/dev/null
job=$(job_of)
held=""
for _ in $(seq 1 1200); do
  held=$(q "SELECT count(DISTINCT l.pid) FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE a.backend_type LIKE 'ekm rotation%' AND l.locktype = 'advisory' AND l.classid = 4242 AND l.objid = 6 AND NOT l.granted")
  [ "$held" = 2 ] && break; sleep 0.05
done
check "6: both workers are held inside batches of the one table" "$held" 2
check "6: each holds a block range of it (ekm.rotation_range, a claim each)" \
  "$(q "SELECT (SELECT count(*) FROM ekm.rotation_range WHERE job_id = $job AND tbl = 'items'::regclass) || ':' ||
               (SELECT count(DISTINCT l.pid) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                WHERE a.backend_type LIKE 'ekm rotation%' AND l.locktype = 'userlock' AND l.objid = 'items'::regclass::oid AND l.objsubid >= 16 AND l.granted)")" 2:2
check "6: the cursor's own part is done (it ends where the first range begins)" \
  "$(q "SELECT next_block >= pass_end AND pass_end <= (SELECT min(r.next_block) FROM ekm.rotation_range r WHERE r.job_id = c.job_id AND r.tbl = c.tbl) FROM ekm.rotation_cursor c WHERE job_id = $job AND tbl = 'items'::regclass")" t
# (the lower half and most of a quarter are done: the ranges left are the rest)
check "6: the progress view shows the ranges and where the pass stands" \
  "$(q "SELECT block_ranges || ' ' || column_state || ' ' || (percent BETWEEN 60 AND 95) FROM ekm.rotation_progress WHERE job_id = $job AND table_name = 'items'::regclass")" '2 scanning true'
helper=$(q "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE a.backend_type = 'ekm rotation helper' AND l.locktype = 'advisory' AND l.classid = 4242 AND l.objid = 6 AND NOT l.granted")
check_match "6: one of them is the helper" "$helper" '^[0-9]+$'
r0=$(crash_restarts "$dir")
kill -KILL "$helper"; check "6: the helper was sent SIGKILL inside its batch" "$?" 0
exec 8>&-; wait "$lock_pid" 2>/dev/null
wait_crash_restart "$dir" "$port" "$r0"
wait 2>/dev/null
for w in 1 2; do cpsql "$dir" "$port" -d app -q -c "CALL item_writer(1000)" >"$dir/writer$w.out" 2>&1 & done
check "6: the job resumes after the restart and ends done" "$(wait_job "$job")" done
wait
check "6: the writers committed without error after the restart" "$(client_errors "$dir/writer1.out" "$dir/writer2.out")" 0
check "6: every row holds what its last writer wrote, on the new key" \
  "$(q "SELECT count(*) FROM items WHERE ekm_decrypt(email, 'items.email') = plain AND ekm_key_id(email) = (SELECT to_key FROM ekm.rotation_job WHERE job_id = $job)")" 60000
check "6: no block range is left, the cursor is done" \
  "$(q "SELECT (SELECT count(*) FROM ekm.rotation_range WHERE job_id = $job) || ':' || state || ':' || (pass_end IS NULL) FROM ekm.rotation_cursor WHERE job_id = $job AND tbl = 'items'::regclass")" 0:done:true
check "6: the old key is retired after the final check" \
  "$(q "SELECT rotation_status FROM ekm.keys WHERE key_id = (SELECT from_key FROM ekm.rotation_job WHERE job_id = $job)")" retired
q "ALTER SYSTEM RESET ekm.rotation_workers" >/dev/null
q "ALTER SYSTEM RESET ekm.rotation_lock_timeout" >/dev/null
q "ALTER SYSTEM RESET deadlock_timeout" >/dev/null
reload

# sections 5's and 6's SIGKILLs (the worker killed, the others ended, the
# reinitialization): nothing else crashed
check_log_clean "$dir/server.log" 6
tap_done
