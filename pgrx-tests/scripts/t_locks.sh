#!/usr/bin/env bash
# No role outside ekm_admin can stall ekm (issue 18, item 4). A role with
# no privileges at all holds every advisory lock ekm used to serialize on
# (key changes, count flushes, a job's worker): key changes, a rotation
# and its worker go on regardless. ekm's own locks (locktype 'userlock')
# are taken only by ekm's functions: an ekm_admin transaction that changed
# a key holds them, and another key change waits at most
# ekm.lock_wait_timeout, then fails with 55P03 naming the holder. While
# that holds the maintenance worker back, the launcher (naptime 1 s) never
# runs a second maintenance worker in the database. Then the races at the
# end of a rotation, with the worker held inside its final step (at
# final_check and at retire): a cancel and a key activation wait for it.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib.sh"
source "$here/tap.sh"
dir=/tmp/ekm-locks; port=61454
source "$here/pause.sh"
trap 'cluster_stop "$dir" immediate >/dev/null 2>&1 || true' EXIT
cluster_start "$dir" "$port" "ekm.auto_rotate_naptime = 1" "ekm.rotation_retry_pause = 100" "ekm.debug_pause_points = on" || exit 1
q() { cpsql "$dir" "$port" -d app -At -q -c "$1" 2>&1; }
q_pg() { cpsql "$dir" "$port" -d postgres -At -q -c "$1" 2>&1; }
q_pg "CREATE DATABASE app" >/dev/null
q "CREATE EXTENSION ekm; CREATE ROLE nobody LOGIN; CREATE ROLE dba LOGIN IN ROLE ekm_admin;
   CREATE TABLE t (id int PRIMARY KEY, v text);
   INSERT INTO t SELECT g, ekm_encrypt('v' || g, 'public.t.v') FROM generate_series(1, 2000) g;
   SELECT ekm_register_column('t', 'v', 'public.t.v')" >/dev/null
next_job=$(( $(q "SELECT coalesce(max(job_id), 0) FROM ekm.rotation_job") + 1 ))

# 1. A role with no privileges takes the advisory locks ekm used to take.
session_start 11 squatter app
session_send 11 "SET ROLE nobody; SELECT pg_advisory_lock(6646638, 1), pg_advisory_lock(6646638, 0), pg_advisory_lock(6646637, $next_job); SELECT 'squatting';"
check "a role with no privileges holds the advisory locks (6646638, 0), (6646638, 1), (6646637, next job)" \
  "$(session_line squatter '^squatting$')" squatting
check_match "a key change does not wait for it" \
  "$(cpsql "$dir" "$port" -d app -At -q -U dba -c "SET statement_timeout = '20s'" -c "SELECT ekm_activate_key(ekm_create_key())" 2>&1)" '^key_'
job=$(cpsql "$dir" "$port" -d app -At -q -U dba -c "SELECT job_id FROM ekm_rotate(force => true) LIMIT 1" 2>&1)
check "the rotation is the job whose advisory lock the role holds" "$job" "$next_job"
check "its worker runs and the job ends done" \
  "$(cpsql "$dir" "$port" -d app -At -q -U dba -c "SELECT state FROM ekm_rotation_wait($job, 60)" 2>/dev/null)" done
session_end 11 squatter

# 2. ekm's own locks: held by an ekm_admin transaction that changed a key;
#    another key change waits at most ekm.lock_wait_timeout.
session_start 12 holder app
session_send 12 "SET ROLE dba; BEGIN; SELECT ekm_activate_key(ekm_create_key()) IS NOT NULL AS activated; SELECT 'holding ' || pg_backend_pid();"
holder=$(session_line holder '^holding ' | awk '{print $2}')
check_match "an ekm_admin transaction holds the key-change lock" \
  "$(q "SELECT locktype || ' ' || classid || ' ' || objid || ' ' || objsubid FROM pg_locks WHERE pid = $holder AND locktype = 'userlock' AND objsubid = 1")" '^userlock 6646637 0 1$'
check "no role can request that lock from SQL (it is no advisory lock)" \
  "$(q "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $holder")" 0
out=$(cpsql "$dir" "$port" -d app -At -q -U dba -v VERBOSITY=verbose -c "SET ekm.lock_wait_timeout = '300ms'" -c "SELECT ekm_activate_key(ekm_create_key())" 2>&1)
check_match "another key change gives up after ekm.lock_wait_timeout with 55P03" "$out" "^ERROR:  55P03: could not change ekm's keys, registrations or jobs: waited 300 ms for ekm's key-change lock"
check_match "and names the process holding it" "$out" "held by pid $holder"
check_match "with a hint" "$out" 'HINT:  another ekm operation is under way'
out=$(cpsql "$dir" "$port" -d app -At -q -U dba -c "SET lock_timeout = '200ms'" -c "SELECT ekm_activate_key(ekm_create_key())" 2>&1)
check_match "the caller's shorter lock_timeout applies" "$out" 'waited 200 ms'

# 3. The maintenance worker is held back by those locks (encryption counts
#    to write down); the launcher starts no second one meanwhile.
q "SELECT count(ekm_encrypt('x' || g)) FROM generate_series(1, 10) g" >/dev/null
max=0
for _ in $(seq 1 40); do
  n=$(q_pg "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'ekm rotation' AND datname = 'app'")
  [ "$n" -gt "$max" ] && max=$n
  sleep 0.1
done
check "a maintenance worker waits for the held lock" "$(q_pg "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE a.backend_type = 'ekm rotation' AND l.locktype = 'userlock' AND NOT l.granted")" 1
check "never more than one ekm worker in the database over 4 s with a 1 s naptime" "$max" 1
check_match "the launcher said why it started no other" "$(grep -c 'maintenance worker of database app is still running' "$dir/server.log")" '^[1-9]'
session_send 12 "COMMIT; SELECT 'released';"
session_line holder '^released$' >/dev/null
session_end 12 holder
for _ in $(seq 1 100); do
  [ "$(q "SELECT sum(encryptions) >= 2010 FROM ekm.key")" = t ] && break
  sleep 0.1
done
check "released, the maintenance worker wrote the counts down" "$(q "SELECT sum(encryptions) >= 2010 FROM ekm.key")" t
# 4. The races at the end of a rotation, with the worker held in its final
#    step (which holds the key-change lock): at final_check, before check
#    #2; and at retire, after a clean check #2.
#    a) cancel + rollback while the final check runs: the cancel waits for
#       the step, which retires the old key and ends the job done; the
#       cancel then finds the job done (and says so), and the rollback moves
#       every value back.
#    b) a key activated between check #2 and the retire: the activation
#       waits; the step retires exactly the key it checked (not the job's
#       new key, which the activation then makes rotating); a new rotation
#       moves those values; every value decrypts throughout.
consistent() { q "SELECT count(*) FILTER (WHERE ekm_decrypt(v, 'public.t.v') = 'v' || id) FROM t"; }
# waits until a client session waits for the key-change lock; says yes/no
session_waits() {
  for _ in $(seq 1 600); do
    [ "$(q "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE l.locktype = 'userlock' AND l.objsubid = 1 AND NOT l.granted AND a.backend_type = 'client backend'")" = 1 ] && { echo yes; return; }
    sleep 0.05
  done
  echo no
}
pause_hold app final_check
k1=$(q "SELECT key_id FROM ekm.keys WHERE is_active")
job=$(cpsql "$dir" "$port" -d app -At -q -U dba -c "SELECT job_id FROM ekm_rotate(force => true) LIMIT 1" 2>&1)
check "4a: the worker reaches its final check" "$(paused_at app final_check)" yes
check "4a: the final step holds the key-change lock" \
  "$(q "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE a.backend_type = 'ekm rotation' AND l.locktype = 'userlock' AND l.objsubid = 1 AND l.granted")" 1
session_start 12 canceller app
session_send 12 "\\set VERBOSITY terse
SET ROLE dba; SELECT ekm_rotation_cancel($job); SELECT 'cancel returned';"
check "4a: the cancel waits for the final step" "$(session_waits)" yes
check "4a: meanwhile the job is running, the old key rotating" \
  "$(q "SELECT state FROM ekm.rotation_job WHERE job_id = $job"):$(q "SELECT rotation_status FROM ekm.keys WHERE key_id = '$k1'")" "running:rotating"
pause_release
session_line canceller '^cancel returned$' >/dev/null
session_end 12 canceller
check_match "4a: the cancel then finds the job done" "$(cat "$dir/canceller.out")" "ERROR:  rotation job $job is done"
check "4a: the job is done and the old key retired" \
  "$(q "SELECT state FROM ekm.rotation_job WHERE job_id = $job"):$(q "SELECT rotation_status FROM ekm.keys WHERE key_id = '$k1'")" "done:retired"
k2=$(q "SELECT key_id FROM ekm.keys WHERE is_active")
rb=$(cpsql "$dir" "$port" -d app -At -q -U dba -c "SELECT job_id FROM ekm_rollback()" 2>&1)
check "4a: the rollback finishes" "$(cpsql "$dir" "$port" -d app -At -q -U dba -c "SELECT state FROM ekm_rotation_wait($rb, 60)" 2>/dev/null)" done
check "4a: every value is back on the previous key and decrypts" \
  "$(q "SELECT count(*) FROM t WHERE ekm_key_id(v) = '$k1'"):$(consistent)" "2000:2000"

pause_hold app retire
job=$(cpsql "$dir" "$port" -d app -At -q -U dba -c "SELECT job_id FROM ekm_rotate(force => true) LIMIT 1" 2>&1)
kfrom=$(q "SELECT from_key FROM ekm.rotation_job WHERE job_id = $job"); kto=$(q "SELECT to_key FROM ekm.rotation_job WHERE job_id = $job")
check "4b: the worker reaches the retire, check #2 clean" "$(paused_at app retire)" yes
session_start 12 activator app
session_send 12 "SET ROLE dba; SELECT ekm_activate_key(ekm_create_key()) IS NOT NULL; SELECT 'activate returned';"
check "4b: the activation waits for the final step" "$(session_waits)" yes
pause_release
session_line activator '^activate returned$' >/dev/null
session_end 12 activator
check "4b: the activation then succeeds" "$(grep -c '^t$' "$dir/activator.out")" 1
check "4b: the job retired exactly the key it checked; its new key is rotating, a third key active" \
  "$(q "SELECT state FROM ekm.rotation_job WHERE job_id = $job"):$(q "SELECT rotation_status FROM ekm.keys WHERE key_id = '$kfrom'"):$(q "SELECT rotation_status FROM ekm.keys WHERE key_id = '$kto'"):$(q "SELECT key_id NOT IN ('$kfrom', '$kto') FROM ekm.keys WHERE is_active")" \
  "done:retired:rotating:t"
check "4b: every value decrypts (on the rotating key)" "$(consistent)" 2000
job=$(cpsql "$dir" "$port" -d app -At -q -U dba -c "SELECT job_id FROM ekm_rotate(force => true) LIMIT 1" 2>&1)
check "4b: a new rotation moves them" "$(cpsql "$dir" "$port" -d app -At -q -U dba -c "SELECT state FROM ekm_rotation_wait($job, 60)" 2>/dev/null)" done
check "4b: every value on the active key and decrypts, the job's key retired" \
  "$(q "SELECT count(*) FROM t WHERE ekm_key_id(v) = (SELECT key_id FROM ekm.keys WHERE is_active)"):$(consistent):$(q "SELECT rotation_status FROM ekm.keys WHERE key_id = '$kto'")" "2000:2000:retired"

check_log_clean "$dir/server.log"
tap_done
