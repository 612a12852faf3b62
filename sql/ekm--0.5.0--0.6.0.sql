-- ekm 0.5.0 -> 0.6.0 (ALTER EXTENSION ekm UPDATE). Frozen once 0.6.0 is
-- released: later changes ship a script of their own, and the upgrade test
-- (pgrx-tests/scripts/t_upgrade.sh) compares an updated database with a
-- fresh install object by object. docs/design.md, section 7.
\echo Use "ALTER EXTENSION ekm UPDATE" to load this file. \quit

-- Rotation of Citus distributed and reference tables (docs/design.md,
-- section 9): a worker node's part of the coordinator's job, and where each
-- node's part stands, on the coordinator. Jobs of 0.5.0 have neither.
ALTER TABLE ekm.rotation_job ADD COLUMN coordinator_job bigint, ADD COLUMN verified_at timestamptz;

CREATE TABLE ekm.rotation_node (
    job_id      bigint NOT NULL REFERENCES ekm.rotation_job ON DELETE CASCADE,
    node        text NOT NULL,
    state       text NOT NULL,
    tables      int NOT NULL DEFAULT 0,
    rows_done   bigint NOT NULL DEFAULT 0,
    rows_total  bigint NOT NULL DEFAULT 0,
    percent     numeric NOT NULL DEFAULT 0,
    blocks_total bigint NOT NULL DEFAULT 0,
    waiting_for text,
    error       text,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, node)
);
SELECT pg_catalog.pg_extension_config_dump('ekm.rotation_node', '');
GRANT SELECT ON ekm.rotation_node TO ekm_admin;

CREATE OR REPLACE VIEW ekm.rotation_progress AS
SELECT * FROM (
  SELECT j.job_id, j.kind, c.tbl AS table_name, c.col AS column_name, j.from_key, j.to_key,
         c.rows_done, greatest(c.rows_total, c.rows_done) AS rows_total,
         -- only goes up: a later pass (values moved behind the first one) stays at 99.9;
         -- the blocks of the pass left: the cursor's own part and the ranges other workers took
         CASE WHEN c.state = 'done' THEN 100.0 WHEN c.passes > 1 THEN 99.9
              ELSE round(least(99.9, 100.0 * (c.blocks_total - greatest(coalesce(c.pass_end, c.blocks_total) - c.next_block, 0)
                                                - coalesce(g.blocks_left, 0))
                                     / greatest(c.blocks_total, 1))::numeric, 1) END AS percent,
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
         j.vacuums, j.vacuum_note,
         -- block ranges of this pass that other workers took and have not finished
         coalesce(g.ranges, 0) AS block_ranges,
         NULL::text AS node
  FROM ekm.rotation_job j
  JOIN ekm.rotation_cursor c USING (job_id)
  CROSS JOIN LATERAL (SELECT round(j.rows_done / greatest(extract(epoch FROM coalesce(j.finished_at, now()) - j.switched_at), 0.001))::bigint
                             AS rows_per_second) r
  LEFT JOIN LATERAL (SELECT pg_relation_size(t.oid) AS heap_bytes,
                            coalesce(pg_total_relation_size(nullif(t.reltoastrelid, 0)), 0) AS toast_bytes
                     FROM pg_class t WHERE t.oid = c.tbl) s ON true
  LEFT JOIN LATERAL (SELECT count(*) AS ranges, sum(greatest(x.hi - x.next_block, 0)) AS blocks_left
                     FROM ekm.rotation_range x
                     WHERE x.job_id = c.job_id AND x.tbl = c.tbl AND c.col = ANY (x.cols)) g ON true
  UNION ALL
  -- on the coordinator of a Citus cluster: each worker node's part of the job
  -- (its shard placements), as the coordinator last read it
  SELECT j.job_id, j.kind, NULL::regclass, NULL::name, j.from_key, j.to_key,
         n.rows_done, greatest(n.rows_total, n.rows_done),
         CASE WHEN n.state IN ('verified', 'done') THEN 100.0 ELSE round(least(n.percent, 99.9), 1) END,
         NULL::bigint, NULL::interval, n.state, NULL::int, j.state, n.waiting_for, n.error,
         j.switched_at, j.finished_at, j.throttled_by, j.throttled_since,
         NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint, NULL::numeric,
         j.vacuums, j.vacuum_note, 0::bigint, n.node
  FROM ekm.rotation_job j JOIN ekm.rotation_node n USING (job_id)
) p
ORDER BY job_id DESC, node NULLS FIRST, table_name::text, column_name;
COMMENT ON VIEW ekm.rotation_progress IS 'Rotation jobs per column: rows done/total, percent, rows/s, ETA, state, error, throttling, table size before and now, vacuums, block ranges other workers took; on a Citus coordinator also one row per worker node (node).';

CREATE FUNCTION ekm."_ekm_cluster_register"(
	"registrations" jsonb /* pgrx :: JsonB */
) RETURNS bigint /* i64 */
STRICT VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_ekm_cluster_register_wrapper';

CREATE FUNCTION ekm."_ekm_node_job"(
	"request" jsonb /* pgrx :: JsonB */
) RETURNS TEXT /* String */
STRICT VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_ekm_node_job_wrapper';

-- superuser only, like ekm._ekm_cluster_apply: the coordinator calls them
REVOKE ALL ON FUNCTION ekm._ekm_cluster_register(jsonb), ekm._ekm_node_job(jsonb) FROM PUBLIC;

-- a worker node's answer to the coordinator's ekm_cleanup_old_keys (counts
-- of values per key, never the values): the coordinator calls it as the
-- caller of ekm_cleanup_old_keys, an ekm_admin
CREATE FUNCTION ekm."_ekm_node_cleanup_check"(
	"keys" TEXT[] /* alloc::vec::Vec<alloc::string::String> */
) RETURNS TEXT /* alloc::string::String */
STRICT VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_ekm_node_cleanup_check_wrapper';
REVOKE ALL ON FUNCTION ekm._ekm_node_cleanup_check(text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ekm._ekm_node_cleanup_check(text[]) TO ekm_admin;
