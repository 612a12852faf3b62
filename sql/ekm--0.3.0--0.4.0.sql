-- ekm 0.3.0 -> 0.4.0 (ALTER EXTENSION ekm UPDATE). Frozen once 0.4.0 is
-- released: later changes ship a script of their own, and the upgrade test
-- (pgrx-tests/scripts/t_upgrade.sh) compares an updated database with a
-- fresh install object by object. docs/design.md, section 7.
\echo Use "ALTER EXTENSION ekm UPDATE" to load this file. \quit

-- Rotation at production scale: what throttles a job, the vacuums behind
-- its batches, and each table's size before it (docs/design.md, section 5,
-- "Pace"). Jobs of 0.3.0 have no size before: their growth shows NULL.
ALTER TABLE ekm.rotation_job
    ADD COLUMN throttled_by    text,
    ADD COLUMN throttled_since timestamptz,
    ADD COLUMN vacuums         int NOT NULL DEFAULT 0,
    ADD COLUMN vacuum_note     text;
ALTER TABLE ekm.rotation_cursor
    ADD COLUMN heap_bytes_before  bigint,
    ADD COLUMN toast_bytes_before bigint;

CREATE OR REPLACE VIEW ekm.rotation_progress AS
SELECT j.job_id, j.kind, c.tbl AS table_name, c.col AS column_name, j.from_key, j.to_key,
       c.rows_done, greatest(c.rows_total, c.rows_done) AS rows_total,
       -- only goes up: a later pass (values moved behind the first one) stays at 99.9
       CASE WHEN c.state = 'done' THEN 100.0 WHEN c.passes > 1 THEN 99.9
            ELSE round(least(99.9, 100.0 * c.next_block / greatest(c.blocks_total, 1))::numeric, 1) END AS percent,
       r.rows_per_second,
       CASE WHEN j.state = 'running' AND c.state <> 'done' AND r.rows_per_second > 0
            THEN make_interval(secs => greatest(c.rows_total - c.rows_done, 0) / r.rows_per_second) END AS eta,
       c.state AS column_state, c.passes, j.state AS job_state, j.waiting_for, j.error,
       j.switched_at AS started_at, j.finished_at,
       j.throttled_by, j.throttled_since,
       -- the table's size when the job began and now (TOAST: its table and index)
       c.heap_bytes_before, s.heap_bytes, c.toast_bytes_before, s.toast_bytes,
       round(100.0 * (s.heap_bytes + s.toast_bytes - c.heap_bytes_before - c.toast_bytes_before)
             / greatest(c.heap_bytes_before + c.toast_bytes_before, 1), 1) AS growth_percent,
       j.vacuums, j.vacuum_note
FROM ekm.rotation_job j
JOIN ekm.rotation_cursor c USING (job_id)
CROSS JOIN LATERAL (SELECT round(j.rows_done / greatest(extract(epoch FROM coalesce(j.finished_at, now()) - j.switched_at), 0.001))::bigint
                           AS rows_per_second) r
LEFT JOIN LATERAL (SELECT pg_relation_size(t.oid) AS heap_bytes,
                          coalesce(pg_total_relation_size(nullif(t.reltoastrelid, 0)), 0) AS toast_bytes
                   FROM pg_class t WHERE t.oid = c.tbl) s ON true
ORDER BY j.job_id DESC, c.tbl::text, c.col;
COMMENT ON VIEW ekm.rotation_progress IS 'Rotation jobs per column: rows done/total, percent, rows/s, ETA, state, error, throttling, table size before and now, vacuums.';
