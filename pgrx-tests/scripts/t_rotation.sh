#!/usr/bin/env bash
# Online rotation against a real cluster: refusals, dry run, concurrent
# writers checked against a plaintext shadow, cancel/resume, a SIGKILLed
# worker, an immediate shutdown with automatic resume at restart, and two
# databases rotating independently. ROWS (default 100000) sets the size.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib.sh"
source "$here/tap.sh"
source "$here/pause.sh"
dir=/tmp/ekm-rotation; port=61438
ROWS=${ROWS:-100000}
writer_pids=()
cleanup() {
  for p in "${writer_pids[@]}"; do kill "$p" 2>/dev/null; done
  cluster_stop "$dir" immediate >/dev/null 2>&1 || true
}
trap cleanup EXIT
cluster_start "$dir" "$port" "ekm.rotation_retry_pause = 200" "max_prepared_transactions = 5" "ekm.debug_pause_points = on" || exit 1
q() { local db=$1; shift; cpsql "$dir" "$port" -d "$db" -At -q -c "$1" 2>&1; }
qerr() { cpsql "$dir" "$port" -d "$1" -At -q -v VERBOSITY=verbose -c "$2" 2>&1 | grep -E '^ERROR' | head -n 1 | sed -E 's/key_[0-9]{8}_[0-9]{6}_[0-9a-f]{4}/key_X/g'; }
wait_job() { # db job timeout_s -> final state
  cpsql "$dir" "$port" -d "$1" -At -q -c "SELECT state FROM ekm_rotation_wait($2, $3)" 2>/dev/null
}

setup_db() {
  q postgres "CREATE DATABASE $1" >/dev/null
  q "$1" "CREATE EXTENSION ekm" >/dev/null
  # shadow holds the plaintext the application last wrote, in the same transaction
  q "$1" "CREATE TABLE people (id int PRIMARY KEY, email text, mobno text, email_shadow text, mobno_shadow text)" >/dev/null
  q "$1" "INSERT INTO people SELECT g, ekm_encrypt(e, 'public.people.email'), ekm_encrypt(m), e, m
          FROM generate_series(1, $ROWS) g, LATERAL (SELECT 'user' || g || '@example.com' AS e, '+91' || lpad(g::text, 10, '0') AS m) v" >/dev/null
  q "$1" "VACUUM ANALYZE people" >/dev/null
}
consistent() { # every row decrypts to its shadow
  q "$1" "SELECT count(*) FROM people WHERE ekm_decrypt(email, 'public.people.email') IS NOT DISTINCT FROM email_shadow
          AND ekm_decrypt(mobno) IS NOT DISTINCT FROM mobno_shadow"
}
total() { q "$1" "SELECT count(*) FROM people"; }
on_active() { q "$1" "SELECT count(*) FROM people WHERE ekm_key_id(email) = (SELECT key_id FROM ekm.keys WHERE is_active)
                      AND ekm_key_id(mobno) = (SELECT key_id FROM ekm.keys WHERE is_active)"; }

setup_db app

# 1. Refusals and the dry run.
check_match "refused with no registered column" "$(qerr app "SELECT * FROM ekm_rotate(force => true)")" '^ERROR:  55000: no column is registered for rotation'
q app "SELECT ekm_register_column('people', 'email', 'public.people.email')" >/dev/null
q app "SELECT ekm_register_column('people', 'mobno')" >/dev/null
check_match "a column with another context is refused" "$(qerr app "SELECT ekm_register_column('people', 'email', 'other')")" '^ERROR:  42710: column "email" of people is already registered with another context'
check_match "a non-text column is refused" "$(qerr app "SELECT ekm_register_column('people', 'id')")" '^ERROR:  42804: column "id" of people is integer'
check_match "refused when the key is not due, with its age and due date" "$(qerr app "SELECT * FROM ekm_rotate()")" '^ERROR:  55000: active key key_X is 0 days old and not due for rotation until [0-9]{4}-'
q app "UPDATE people SET email = 'plain@example.com', email_shadow = NULL WHERE id = 1" >/dev/null
before=$(q app "SELECT md5(string_agg(email || mobno, ',' ORDER BY id)) || (SELECT count(*) FROM ekm.keys) FROM people")
check "dry run counts values to move, plaintext, unusable keys" "$(q app "SELECT string_agg(column_name || ':' || values_to_move || ':' || values_not_encrypted || ':' || values_on_unusable_keys || ':' || (note IS NOT NULL), ',' ORDER BY column_name) FROM ekm_rotate(dry_run => true)")" "email:$((ROWS - 1)):1:0:true,mobno:$ROWS:0:0:false"
check "dry run changes nothing" "$(q app "SELECT md5(string_agg(email || mobno, ',' ORDER BY id)) || (SELECT count(*) FROM ekm.keys) FROM people")" "$before"
q app "UPDATE people SET email = ekm_encrypt('user1@example.com', 'public.people.email'), email_shadow = 'user1@example.com' WHERE id = 1" >/dev/null
check_match "waiting inside the transaction that started the job is refused (it would never end)" \
  "$(cpsql "$dir" "$port" -d app -At -q -v VERBOSITY=verbose -c "BEGIN" -c "SELECT ekm_rotation_wait((SELECT job_id FROM ekm_rotate(force => true) LIMIT 1))" 2>&1 | grep -E '^ERROR' | head -n 1)" \
  '^ERROR:  55000: rotation job [0-9]+ was started in this transaction'
check "and nothing of it remains" "$(q app "SELECT count(*) FROM ekm.rotation_job")" 0

# 2. Rotation under concurrent writers (updates, inserts, deletes), each
#    writing the plaintext shadow in the same transaction.
writer() { # seed
  local i=0 sql
  while [ -f "$dir/writers.on" ] && [ $i -lt 100000 ]; do
    sql=""
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      id=$(( (RANDOM * 32768 + RANDOM) % ROWS + 1 ))
      sql+="UPDATE people SET email = ekm_encrypt('w$1-$i@example.com', 'public.people.email'), email_shadow = 'w$1-$i@example.com', mobno = ekm_encrypt('m$1-$i'), mobno_shadow = 'm$1-$i' WHERE id = $id;"
      i=$((i + 1))
    done
    sql+="INSERT INTO people VALUES ($ROWS + $1 * 1000000 + $i, ekm_encrypt('n$1-$i', 'public.people.email'), ekm_encrypt('nm$1-$i'), 'n$1-$i', 'nm$1-$i');"
    sql+="DELETE FROM people WHERE id = $(( (RANDOM * 32768 + RANDOM) % ROWS + 1 ));"
    # an update that leaves the encrypted columns as they are: the row's new
    # version, with values maybe still on the old key, goes to the end of
    # the table, past where the pass ends
    sql+="UPDATE people SET email_shadow = email_shadow WHERE id = $(( (RANDOM * 32768 + RANDOM) % ROWS + 1 ));"
    sql+="UPDATE writer_tx SET n = n + 1 WHERE w = $1;"
    printf 'BEGIN;%sCOMMIT;\n' "$sql"
  done | cpsql "$dir" "$port" -d app -q >/dev/null 2>"$dir/writer$1.err" 11>&- 12>&- 13>&- 14>&-
}
# each writer counts its committed transactions, in the same transaction
q app "CREATE TABLE writer_tx (w int PRIMARY KEY, n bigint NOT NULL); INSERT INTO writer_tx VALUES (1, 0), (2, 0), (3, 0)" >/dev/null
committed() { q app "SELECT sum(n) FROM writer_tx"; }
touch "$dir/writers.on"
for w in 1 2 3; do writer $w & writer_pids+=($!); done
for _ in $(seq 1 100); do [ "$(committed)" -gt 0 ] && break; sleep 0.1; done
# the worker is held at its first check, so the job is still running when
# the writers' count is read there
pause_hold app check
job=$(q app "SELECT job_id FROM ekm_rotate(batch_size => 500, force => true) LIMIT 1")
tx0=$(committed)
check_match "ekm_rotate returns a job id at once" "$job" '^[0-9]+$'
check_match "a second rotation is refused while one runs" "$(qerr app "SELECT * FROM ekm_rotate(force => true)")" "^ERROR:  55006: rotation job $job is already running"
check_match "progress is visible from another session" "$(q app "SELECT count(*) FROM ekm.rotation_progress WHERE job_id = $job")" '^2$'
check "the worker ends its passes and waits at its first check" "$(paused_at app check)" yes
tx1=$(committed)
check_match "the writers committed transactions during the passes ($tx0 -> $tx1)" "$(q app "SELECT state FROM ekm.rotation_job WHERE job_id = $job"):$((tx1 - tx0))" '^running:[1-9][0-9]*$'
pause_release
state=$(wait_job app "$job" 300)
rm -f "$dir/writers.on"; for p in "${writer_pids[@]}"; do wait "$p"; done; writer_pids=()
check "rotation under concurrent writers finishes" "$state" done
check "writers saw no errors (nor a failed connection)" "$(client_errors "$dir"/writer*.err)" 0
check "no write lost: every row decrypts to what the application last wrote" "$(consistent app)" "$(total app)"
check "every value is on the new key" "$(on_active app)" "$(total app)"
check "the final check found values moved past the end of the pass and sent them back for another pass" "$(q app "SELECT max(passes) > 1 FROM ekm.rotation_cursor WHERE job_id = $job")" t
check "the old key is retired" "$(q app "SELECT rotation_status FROM ekm.keys k JOIN ekm.rotation_job j ON j.from_key = k.key_id WHERE j.job_id = $job")" retired
# (the job's count against values counted independently: sections 4 and 5,
# without writers)
check_match "job start and finish are audited" "$(q app "SELECT string_agg(event, ',' ORDER BY id) FROM ekm.audit_log WHERE event LIKE 'rotation%'")" 'rotation_started,rotation_done$'

# 2b. A transaction that began after the key switch copies values still on
#     the old key into another registered table, and commits only after the
#     passes have ended: its rows were invisible to the passes and to a check
#     then. The job waits for it, moves the copies, and only then retires the
#     old key; the copies decrypt throughout.
q app "CREATE TABLE archive (id int PRIMARY KEY, email text)" >/dev/null
q app "SELECT ekm_register_column('archive', 'email', 'public.people.email')" >/dev/null
q postgres "ALTER SYSTEM SET ekm.rotation_batch_pause = 300" >/dev/null; q postgres "SELECT pg_reload_conf()" >/dev/null; sleep 0.5
job=$(q app "SELECT job_id FROM ekm_rotate(batch_size => 10000, force => true) LIMIT 1")
old_key=$(q app "SELECT from_key FROM ekm.rotation_job WHERE job_id = $job")
coproc COPIER { cpsql "$dir" "$port" -d app -At -q 2>&1; }
# the last rows of the table: the slow pass reaches them last
echo "BEGIN; INSERT INTO archive SELECT id, email FROM people WHERE id BETWEEN $ROWS - 999 AND $ROWS; SELECT count(*) FROM archive WHERE ekm_key_id(email) = '$old_key';" >&"${COPIER[1]}"
IFS= read -r -t 60 copied <&"${COPIER[0]}"
# (a few of those rows may sit elsewhere in the table after section 2's
# writers, and be moved before the copy reads them)
check_match "the open transaction copied values still on the old key" "$copied" '^[1-9][0-9]{2,}$'
q postgres "ALTER SYSTEM SET ekm.rotation_batch_pause = 0" >/dev/null; q postgres "SELECT pg_reload_conf()" >/dev/null
# (other sessions' statements may be counted too while the copy runs: their
# snapshots are older than the fence; wait until only the copy is left)
waiting_until() { # job regex -> waiting_for, once it matches (30 s at most)
  local w=""
  for _ in $(seq 1 300); do
    w=$(q app "SELECT waiting_for FROM ekm.rotation_job WHERE job_id = $1")
    [[ "$w" =~ $2 ]] && break; sleep 0.1
  done
  echo "$w"
}
copier_pid=$(q app "SELECT pid FROM pg_stat_activity WHERE datname = 'app' AND backend_xid IS NOT NULL AND state = 'idle in transaction'")
check_match "the job waits for the transaction that was running when the passes ended" "$(waiting_until "$job" "^1 transactions that were running when the last pass ended \\(pids $copier_pid\\)")" "^1 transactions that were running when the last pass ended \(pids $copier_pid\)"
check "every column's pass is done" "$(q app "SELECT bool_and(state = 'done') FROM ekm.rotation_cursor WHERE job_id = $job")" t
check "the old key is still rotating (it decrypts)" "$(q app "SELECT rotation_status FROM ekm.keys WHERE key_id = '$old_key'")" rotating
echo "COMMIT;" >&"${COPIER[1]}"; exec {COPIER[1]}>&-; wait "$COPIER_PID" 2>/dev/null
check "when it commits the job moves the copies and finishes" "$(wait_job app "$job" 120)" done
check_match "every copy is on the new key and decrypts to its original" "$(q app "SELECT count(*) || ':' || count(*) FILTER (WHERE ekm_key_id(a.email) = (SELECT key_id FROM ekm.keys WHERE is_active) AND ekm_decrypt(a.email, 'public.people.email') = p.email_shadow) FROM archive a JOIN people p USING (id)")" '^([0-9]{3,}):\1$'
check "the old key is retired" "$(q app "SELECT rotation_status FROM ekm.keys WHERE key_id = '$old_key'")" retired
# The same copy in a prepared transaction (not a session any more).
q postgres "ALTER SYSTEM SET ekm.rotation_batch_pause = 300" >/dev/null; q postgres "SELECT pg_reload_conf()" >/dev/null; sleep 0.5
job=$(q app "SELECT job_id FROM ekm_rotate(batch_size => 10000, force => true) LIMIT 1")
old_key=$(q app "SELECT from_key FROM ekm.rotation_job WHERE job_id = $job")
cpsql "$dir" "$port" -d app -At -q -c "BEGIN" -c "INSERT INTO archive SELECT id, email FROM people WHERE id BETWEEN $ROWS - 1999 AND $ROWS - 1000" -c "PREPARE TRANSACTION 'ekm_copy'" >/dev/null 2>&1
check "a prepared transaction holds copies" "$(q app "SELECT count(*) FROM pg_prepared_xacts WHERE gid = 'ekm_copy'")" 1
q postgres "ALTER SYSTEM SET ekm.rotation_batch_pause = 0" >/dev/null; q postgres "SELECT pg_reload_conf()" >/dev/null
check_match "the job waits for the prepared transaction and names it" "$(waiting_until "$job" "^1 prepared transactions")" "^1 prepared transactions \(gids 'ekm_copy'; COMMIT PREPARED or ROLLBACK PREPARED them\)"
check "the old key is still rotating" "$(q app "SELECT rotation_status FROM ekm.keys WHERE key_id = '$old_key'")" rotating
q app "COMMIT PREPARED 'ekm_copy'" >/dev/null
check "when it is committed the job moves its copies and finishes" "$(wait_job app "$job" 120)" done
check_match "every copy is on the new key and decrypts" "$(q app "SELECT count(*) || ':' || count(*) FILTER (WHERE ekm_key_id(a.email) = (SELECT key_id FROM ekm.keys WHERE is_active) AND ekm_decrypt(a.email, 'public.people.email') = p.email_shadow) FROM archive a JOIN people p USING (id)")" '^([0-9]{3,}):\1$'
# Sessions waiting in ekm_rotation_wait are not waited for: so their
# transaction may not commit a write (it could write back what it read before).
q postgres "ALTER SYSTEM SET ekm.rotation_batch_pause = 300" >/dev/null; q postgres "SELECT pg_reload_conf()" >/dev/null; sleep 0.5
job=$(q app "SELECT job_id FROM ekm_rotate(batch_size => 10000, force => true) LIMIT 1")
check_match "waiting in a transaction that has written data is refused (the job would wait for that transaction)" \
  "$(cpsql "$dir" "$port" -d app -At -q -v VERBOSITY=verbose -c "BEGIN" -c "SELECT pg_current_xact_id()" -c "SELECT ekm_rotation_wait($job, 5)" 2>&1 | grep -E '^ERROR' | head -n 1)" \
  "^ERROR:  55000: ekm_rotation_wait cannot wait for job $job in a transaction that has written data"
check_match "a transaction that waited for a running job cannot commit a write" \
  "$(cpsql "$dir" "$port" -d app -At -q -v VERBOSITY=verbose -c "BEGIN" -c "SELECT email FROM people WHERE id = 1" -c "SELECT state FROM ekm_rotation_wait($job, 1)" -c "INSERT INTO archive VALUES (-1, 'x')" -c "COMMIT" 2>&1 | grep -E '^ERROR' | head -n 1)" \
  '^ERROR:  55000: a transaction that waited in ekm_rotation_wait cannot write data'
check "and nothing of it was written" "$(q app "SELECT count(*) FROM archive WHERE id = -1")" 0
q postgres "ALTER SYSTEM SET ekm.rotation_batch_pause = 0" >/dev/null; q postgres "SELECT pg_reload_conf()" >/dev/null
check "that job finishes" "$(wait_job app "$job" 120)" done
q app "SELECT ekm_unregister_column('archive', 'email')" >/dev/null

# 3. NOTIFY on completion, cancel and resume.
listen_out=$dir/listen.out
( printf 'LISTEN ekm_rotation;\n'; for _ in $(seq 1 120); do sleep 0.5; printf 'SELECT 1;\n'; done ) | cpsql "$dir" "$port" -d app > "$listen_out" 2>&1 &
listener=$!
sleep 0.5
job=$(q app "SELECT job_id FROM ekm_rotate(batch_size => 100, force => true) LIMIT 1")
sleep 0.3
check_match "cancel" "$(q app "SELECT ekm_rotation_cancel($job)")" "running -> cancelled"
moved_now() { q app "SELECT (SELECT rows_done FROM ekm.rotation_job WHERE job_id = $job) || ':' || count(*) FROM people WHERE ekm_key_id(email) = (SELECT key_id FROM ekm.keys WHERE is_active)"; }
at_cancel=$(moved_now)
sleep 1
check "nothing moves once the cancel has committed (a batch that finds the job cancelled rolls back)" "$(moved_now)" "$at_cancel"
check "a cancelled job stays cancelled" "$(q app "SELECT state FROM ekm.rotation_job WHERE job_id = $job")" cancelled
check "after cancel every value decrypts" "$(consistent app)" "$(total app)"
check_match "a new rotation is refused while one is cancelled" "$(qerr app "SELECT * FROM ekm_rotate()")" "^ERROR:  55006: rotation job $job was cancelled"
check_match "resume" "$(q app "SELECT ekm_rotation_resume($job)")" "cancelled -> running"
check "the resumed job finishes" "$(wait_job app "$job" 120)" done
check "after resume every value is on the new key" "$(on_active app)" "$(total app)"
sleep 1; kill "$listener" 2>/dev/null; wait "$listener" 2>/dev/null
check_match "NOTIFY ekm_rotation carries the job id and outcome" "$(cat "$listen_out")" "\"job_id\": \"$job\", \"outcome\": \"done\""

# 4. and 5. A crash and an immediate shutdown in the middle of a job. The
#    worker is held at named steps (docs/design.md, "Pause points"): at the
#    end of people's pass, then at the first batch of the second table, so
#    the job is running with people moved and "more" not yet: a state the
#    kill or the shutdown provably interrupts. Without writers, the job's
#    count must equal the values that were on the old key before it began,
#    counted here from the table.
q app "CREATE TABLE more (id int PRIMARY KEY, email text)" >/dev/null
q app "INSERT INTO more SELECT g, ekm_encrypt('more' || g || '@example.com', 'public.people.email') FROM generate_series(1, 5000) g" >/dev/null
q app "SELECT ekm_register_column('more', 'email', 'public.people.email')" >/dev/null
values_on_active() { q app "SELECT (SELECT count(*) FILTER (WHERE ekm_key_id(email) = k.key_id) + count(*) FILTER (WHERE ekm_key_id(mobno) = k.key_id) FROM people) + (SELECT count(*) FROM more WHERE ekm_key_id(email) = k.key_id) FROM ekm.keys k WHERE k.is_active"; }
# hold_mid_job: starts a job and holds its worker at more's first batch;
# sets $job and $wpid and checks the state reached.
hold_mid_job() {
  to_move=$(values_on_active)
  pause_hold app pass_end
  job=$(q app "SELECT job_id FROM ekm_rotate(batch_size => 200, force => true) LIMIT 1")
  check "the worker ends people's pass and waits" "$(paused_at app pass_end)" yes
  pause_also batch
  pause_let pass_end
  check "the worker waits at the first batch of the second table" "$(paused_at app batch)" yes
  check "the job is running, with people moved and more not yet" \
    "$(q app "SELECT state || ':' || rows_done FROM ekm.rotation_job WHERE job_id = $job"):$(q app "SELECT count(*) FROM more WHERE ekm_key_id(email) = (SELECT from_key FROM ekm.rotation_job WHERE job_id = $job)")" \
    "running:$((2 * $(total app))):5000"
  wpid=$(q app "SELECT pid FROM pg_stat_activity WHERE backend_type = 'ekm rotation' AND wait_event_type = 'Lock'")
  check_match "the worker is the process waiting there" "$wpid" '^[0-9]+$'
}
wait_up() { for _ in $(seq 1 100); do q app "SELECT 1" >/dev/null 2>&1 && return 0; sleep 0.2; done; return 1; }
after_interruption() { # what
  check "after $1 every value decrypts" "$(consistent app)" "$(total app)"
  check "after $1 the job resumes by itself and finishes" "$(wait_job app "$job" 120)" done
  check "every value is on the new key" "$(on_active app):$(q app "SELECT count(*) FROM more WHERE ekm_key_id(email) = (SELECT key_id FROM ekm.keys WHERE is_active)")" "$(total app):5000"
  check "the job counted each value it moved once (the interrupted batch rolled back)" "$(q app "SELECT rows_done FROM ekm.rotation_job WHERE job_id = $job")" "$to_move"
}

# 4. SIGKILL: the postmaster ends every backend and reinitializes; the
#    launcher resumes the job by itself.
hold_mid_job
r0=$(crash_restarts "$dir")
kill -KILL "$wpid"; check "the worker was sent SIGKILL" "$?" 0
wait_crash_restart "$dir" "$port" "$r0"
check "the killed worker is gone" "$(q app "SELECT count(*) FROM pg_stat_activity WHERE pid = $wpid")" 0
check "the server log shows the worker killed and the crash restart" \
  "$(grep -c "(PID $wpid) was terminated by signal 9" "$dir/server.log"):$(grep -c 'all server processes terminated; reinitializing' "$dir/server.log")" "1:1"
pause_release # (its session ended with the crash)
after_interruption "SIGKILL"

# 4b. A crash inside a batch: a trigger of the table waits (on a lock this
#     script holds) in the middle of the batch's UPDATE, after it has
#     rewritten half of the table's rows and written their audit rows; the
#     worker is killed there. The partial batch is rolled back with the
#     crash and redone once: every row ends on the new key with exactly one
#     audit row, and the job counts each value once.
q app "CREATE TABLE mid (id int PRIMARY KEY, email text, shadow text);
       CREATE TABLE mid_audit (id int, email text);
       CREATE FUNCTION mid_audit_fn() RETURNS trigger LANGUAGE plpgsql AS \$\$
       BEGIN
         INSERT INTO public.mid_audit VALUES (NEW.id, NEW.email);
         IF NEW.id = 300 THEN PERFORM pg_catalog.pg_advisory_xact_lock_shared(4242, 1); END IF;
         RETURN NULL;
       END \$\$;
       CREATE TRIGGER mid_audit AFTER UPDATE ON mid FOR EACH ROW EXECUTE FUNCTION mid_audit_fn();
       INSERT INTO mid SELECT g, ekm_encrypt('mid' || g, 'public.mid.email'), 'mid' || g FROM generate_series(1, 600) g;
       SELECT ekm_register_column('mid', 'email', 'public.mid.email')" >/dev/null
q app "VACUUM ANALYZE mid" >/dev/null
to_move=$(( $(values_on_active) + 600 ))
# a batch waits for a lock at most least(ekm.rotation_lock_timeout,
# deadlock_timeout / 2): long enough here for the wait to be seen
q app "ALTER SYSTEM SET ekm.rotation_lock_timeout = 600000" >/dev/null
q app "ALTER SYSTEM SET deadlock_timeout = '20min'" >/dev/null
# one batch for the whole of mid: without the vacuum behind the batches a
# batch is the job's batch size (with it, a small table's batches are cut to
# 2% of its blocks, and the first ones would have committed)
q app "ALTER SYSTEM SET ekm.rotation_vacuum_growth = 0" >/dev/null
q app "SELECT pg_reload_conf()" >/dev/null; sleep 0.5
session_start 13 midlock app
session_send 13 "SELECT pg_advisory_lock(4242, 1); SELECT 'held';"
session_line midlock '^held$' >/dev/null
job=$(q app "SELECT job_id FROM ekm_rotate(batch_size => 1000, force => true) LIMIT 1")
wpid=""
for _ in $(seq 1 600); do
  wpid=$(q app "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE a.backend_type = 'ekm rotation' AND l.locktype = 'advisory' AND l.classid = 4242 AND NOT l.granted")
  [ -n "$wpid" ] && break
  sleep 0.1
done
check_match "the worker waits inside mid's batch (its trigger, at row 300)" "$wpid" '^[0-9]+$'
check "it holds mid for its UPDATE while it waits" \
  "$(q app "SELECT count(*) FROM pg_locks WHERE pid = ${wpid:-0} AND relation = 'mid'::regclass AND mode = 'RowExclusiveLock' AND granted")" 1
check "half a batch done and not committed: no row of mid on the new key, no audit row seen" \
  "$(q app "SELECT count(*) FROM mid WHERE ekm_key_id(email) = (SELECT to_key FROM ekm.rotation_job WHERE job_id = $job)"):$(q app "SELECT count(*) FROM mid_audit")" "0:0"
r0=$(crash_restarts "$dir")
kill -KILL "$wpid"; check "the worker was sent SIGKILL inside the batch" "$?" 0
wait_crash_restart "$dir" "$port" "$r0"
session_end 13 midlock # (its session ended with the crash)
# (the launcher resumes the job at once: whether mid is redone yet is not
# asked here; that it was redone exactly once is, below)
check "after the crash every row of mid decrypts" \
  "$(q app "SELECT count(*) FILTER (WHERE ekm_decrypt(email, 'public.mid.email') = shadow) FROM mid")" 600
check "the job resumes by itself and finishes" "$(wait_job app "$job" 120)" done
check "every row of mid is on the new key and decrypts to its shadow" \
  "$(q app "SELECT count(*) FROM mid WHERE ekm_key_id(email) = (SELECT key_id FROM ekm.keys WHERE is_active) AND ekm_decrypt(email, 'public.mid.email') = shadow")" 600
check "the redone batch wrote one audit row per row (the killed one's rolled back)" \
  "$(q app "SELECT count(*) || ':' || count(DISTINCT id) || ':' || count(*) FILTER (WHERE a.email = m.email) FROM mid_audit a JOIN mid m USING (id)")" "600:600:600"
check "the job counted each value it moved once" "$(q app "SELECT rows_done FROM ekm.rotation_job WHERE job_id = $job")" "$to_move"
q app "SELECT ekm_unregister_column('mid', 'email')" >/dev/null
q app "ALTER SYSTEM RESET ekm.rotation_lock_timeout" >/dev/null
q app "ALTER SYSTEM RESET deadlock_timeout" >/dev/null
q app "ALTER SYSTEM RESET ekm.rotation_vacuum_growth" >/dev/null
q app "SELECT pg_reload_conf()" >/dev/null; sleep 0.5

# 5. Immediate shutdown in the middle of a job, then a restart.
hold_mid_job
recoveries=$(grep -c 'automatic recovery in progress' "$dir/server.log")
cluster_stop "$dir" immediate
check "the server stopped while the job was held" "$(test -f "$dir/data/postmaster.pid" && echo running || echo stopped)" stopped
pause_release
cluster_restart_only "$dir"
wait_up
check "the server log shows the immediate shutdown and the recovery at restart" \
  "$(grep -c 'received immediate shutdown request' "$dir/server.log"):$(grep -c 'automatic recovery in progress' "$dir/server.log")" "1:$((recoveries + 1))"
after_interruption "an immediate shutdown"

# 6. Two databases rotate independently.
ROWS=20000 setup_db other
q other "SELECT ekm_register_column('people', 'email', 'public.people.email')" >/dev/null
q other "SELECT ekm_register_column('people', 'mobno')" >/dev/null
ja=$(q app "SELECT job_id FROM ekm_rotate(force => true) LIMIT 1")
jb=$(q other "SELECT job_id FROM ekm_rotate(force => true) LIMIT 1")
check "database app finishes" "$(wait_job app "$ja" 120)" done
check "database other finishes" "$(wait_job other "$jb" 120)" done
check "other: every value decrypts and is on its new key" "$(consistent other):$(on_active other)" "$(total other):$(total other)"
ka=$(q app "SELECT key_id FROM ekm.keys WHERE is_active"); kb=$(q other "SELECT key_id FROM ekm.keys WHERE is_active")
check "the databases have their own keys" "$([ -n "$ka" ] && [ "$ka" != "$kb" ] && echo distinct)" distinct
check_match "no rotation worker left running" "$(q app "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'ekm rotation'")" '^0$'
# the crashes of sections 4 and 4b (each: the worker killed, the others
# ended, the reinitialization): nothing else crashed
check_log_clean "$dir/server.log" 6
tap_done
