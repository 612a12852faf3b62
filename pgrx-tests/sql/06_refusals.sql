-- Refusals that need a job in a given state, each with its SQLSTATE and
-- hint. The job is held at its first batch with a pause point
-- (ekm.debug_pause_points is on in the regression cluster; docs/design.md)
-- so that its state is known at every statement. Job numbers are masked.
\pset null '(null)'
CREATE FUNCTION tryj(q text) RETURNS text LANGUAGE sql AS $$
    SELECT regexp_replace(regexp_replace(try_hint(q), 'job [0-9]+', 'job N', 'g'), 'ekm_rotation_[a-z]+\([0-9]+\)', 'ekm_rotation_...(N)', 'g') $$;
CREATE TABLE refusals (id int PRIMARY KEY, v text);
INSERT INTO refusals SELECT g, ekm_encrypt('r' || g, 'refusals.v') FROM generate_series(1, 50) g;
SELECT ekm_register_column('refusals', 'v', 'refusals.v');
SELECT count(*) AS unfinished_jobs FROM ekm.rotation_job WHERE state IN ('running', 'cancelled', 'needs_attention');

-- A column that is not registered; a job that does not exist.
SELECT tryj($$SELECT ekm_unregister_column('refusals', 'id')$$) AS not_registered;
SELECT tryj($$SELECT * FROM ekm_rotation_wait(999999)$$) AS wait_no_job;
SELECT tryj($$SELECT ekm_rotation_cancel(999999)$$) AS cancel_no_job;
SELECT tryj($$SELECT ekm_rotation_resume(999999)$$) AS resume_no_job;
-- Waiting needs READ COMMITTED (its snapshot must see the job move).
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT tryj($$SELECT * FROM ekm_rotation_wait(1)$$) AS wait_in_repeatable_read;
ROLLBACK;
-- Bad arguments.
SELECT tryj($$SELECT * FROM ekm_rotate(batch_size => 0, force => true)$$) AS zero_batch;
SELECT tryj($$SELECT * FROM ekm_scan_database(-1)$$) AS negative_batch;
SELECT tryj($$SELECT * FROM ekm_cleanup_old_keys(-1)$$) AS negative_days;

-- Hold the next job at its first batch.
SELECT pg_advisory_lock(1701539184, 1);
SELECT count(*) AS rotation_started FROM ekm_rotate(force => true);
-- (waits for the worker to reach the pause point: a condition, polled)
DO $$ BEGIN
  FOR i IN 1..3000 LOOP
    EXIT WHEN EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND classid = 1701539184 AND objid = 1 AND NOT granted);
    PERFORM pg_sleep(0.01);
  END LOOP;
END $$;
SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND classid = 1701539184 AND objid = 1 AND NOT granted) AS worker_paused,
       (SELECT state FROM ekm.rotation_job WHERE job_id = (SELECT max(job_id) FROM ekm.rotation_job)) AS state;
-- Progress of the held job, per column (nothing moved yet).
SELECT kind, table_name, column_name, rows_done, rows_total, percent, column_state, passes, job_state, eta IS NULL AS no_eta_yet
FROM ekm.rotation_progress WHERE job_id = (SELECT max(job_id) FROM ekm.rotation_job);
SELECT table_name, column_name, context, key_state, values FROM ekm.registered_columns WHERE table_name = 'refusals'::regclass ORDER BY key_state;
-- While it runs: a second rotation, a rollback, a column encryption and
-- unregistering are refused; so is waiting inside the transaction that
-- has written.
SELECT tryj($$SELECT * FROM ekm_rotate(force => true)$$) AS second_rotation;
SELECT tryj($$SELECT * FROM ekm_rollback()$$) AS rollback_while_running;
SELECT tryj($$SELECT * FROM ekm_encrypt_column('refusals', 'v')$$) AS encrypt_while_running;
SELECT tryj($$SELECT ekm_unregister_column('refusals', 'v')$$) AS unregister_while_running;
-- (resuming a running job starts a worker for it, as for a stuck one; the
-- job's lock lets only one run it)
SELECT tryj($$SELECT ekm_rotation_resume((SELECT max(job_id) FROM ekm.rotation_job))$$) AS resume_running;
BEGIN;
SELECT pg_current_xact_id() IS NOT NULL AS wrote;
SELECT tryj($$SELECT * FROM ekm_rotation_wait((SELECT max(job_id) FROM ekm.rotation_job), 0.1)$$) AS wait_after_writing;
ROLLBACK;
-- Cancelled: a new rotation is refused without force; resume continues.
SELECT ekm_rotation_cancel((SELECT max(job_id) FROM ekm.rotation_job)) LIKE '%running -> cancelled' AS cancelled;
SELECT tryj($$SELECT ekm_rotation_cancel((SELECT max(job_id) FROM ekm.rotation_job))$$) AS cancel_twice;
SELECT tryj($$SELECT * FROM ekm_rotate()$$) AS rotate_after_cancel;
SELECT tryj($$SELECT * FROM ekm_encrypt_column('refusals', 'v')$$) AS encrypt_after_cancel;
SELECT ekm_rotation_resume((SELECT max(job_id) FROM ekm.rotation_job)) LIKE '%cancelled -> running' AS resumed;
SELECT pg_advisory_unlock(1701539184, 1);
SET client_min_messages = warning;
SELECT state FROM ekm_rotation_wait((SELECT max(job_id) FROM ekm.rotation_job));
RESET client_min_messages;
SELECT kind, table_name, column_name, rows_done, rows_total, percent, column_state, passes, job_state, finished_at IS NOT NULL AS finished
FROM ekm.rotation_progress WHERE job_id = (SELECT max(job_id) FROM ekm.rotation_job);
SELECT tryj($$SELECT ekm_rotation_cancel((SELECT max(job_id) FROM ekm.rotation_job))$$) AS cancel_done;
SELECT tryj($$SELECT ekm_rotation_resume((SELECT max(job_id) FROM ekm.rotation_job))$$) AS resume_done;
SELECT count(*) FILTER (WHERE ekm_decrypt(v, 'refusals.v') = 'r' || id) AS values_decrypt FROM refusals;

-- A wrapped key whose material was altered (a superuser's hand edit): a
-- new session that needs it gets XX001, with nothing else changed.
SELECT ekm_activate_key(ekm_create_key()) IS NOT NULL AS new_active_key;
UPDATE ekm.key_material SET wrapped = set_byte(wrapped, 20, get_byte(wrapped, 20) # 1)
WHERE key_id = (SELECT key_id FROM ekm.keys WHERE is_active);
\c
SELECT try($$SELECT ekm_encrypt('x')$$) AS corrupt_wrapped_key;
SELECT ekm_decrypt(v, 'refusals.v') = 'r1' AS other_keys_still_decrypt FROM refusals WHERE id = 1;
UPDATE ekm.key_material SET wrapped = set_byte(wrapped, 20, get_byte(wrapped, 20) # 1)
WHERE key_id = (SELECT key_id FROM ekm.keys WHERE is_active);
\c
SELECT ekm_decrypt(ekm_encrypt('x')) AS repaired;

-- The key id and creation time are ekm's, not the table's: its own guard
-- answers (before the foreign key from key_material would).
SELECT try_hint($$UPDATE ekm.key SET key_id = 'key_20200101_000000_0000' WHERE is_active$$) AS change_key_id;
SELECT try_hint($$UPDATE ekm.key SET created_at = now() - interval '1 day' WHERE is_active$$) AS change_created_at;

SELECT ekm_unregister_column('refusals', 'v');
DROP TABLE refusals;
DROP FUNCTION tryj(text);
