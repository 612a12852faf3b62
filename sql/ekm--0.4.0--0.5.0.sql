-- ekm 0.4.0 -> 0.5.0 (ALTER EXTENSION ekm UPDATE). Frozen once 0.5.0 is
-- released: later changes ship a script of their own, and the upgrade test
-- (pgrx-tests/scripts/t_upgrade.sh) compares an updated database with a
-- fresh install object by object. docs/design.md, section 7.
\echo Use "ALTER EXTENSION ekm UPDATE" to load this file. \quit

-- Block ranges of one table for several workers (ekm.rotation_workers;
-- docs/design.md, section 5, "Workers"). Jobs of 0.4.0 have no ranges.
ALTER TABLE ekm.rotation_cursor ADD COLUMN pass_end bigint;

CREATE TABLE ekm.rotation_range (
    job_id     bigint NOT NULL REFERENCES ekm.rotation_job ON DELETE CASCADE,
    tbl        regclass NOT NULL,
    seq        smallint NOT NULL CHECK (seq >= 0),   -- a worker's claim on it is (tbl, seq)
    cols       name[] NOT NULL,
    next_block bigint NOT NULL,
    hi         bigint NOT NULL,
    PRIMARY KEY (job_id, tbl, seq)
);
SELECT pg_catalog.pg_extension_config_dump('ekm.rotation_range', '');
GRANT SELECT ON ekm.rotation_range TO ekm_admin;

CREATE OR REPLACE VIEW ekm.rotation_progress AS
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
       coalesce(g.ranges, 0) AS block_ranges
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
ORDER BY j.job_id DESC, c.tbl::text, c.col;
COMMENT ON VIEW ekm.rotation_progress IS 'Rotation jobs per column: rows done/total, percent, rows/s, ETA, state, error, throttling, table size before and now, vacuums, block ranges other workers took.';

-- One key catalog for a Citus cluster (docs/design.md, section 9): a worker
-- node's keys are the coordinator's, sent with every key change in the
-- coordinator's distributed transaction.
CREATE FUNCTION @extschema@."ekm_cluster_sync"() RETURNS bigint /* i64 */
STRICT VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'ekm_cluster_sync_wrapper';

CREATE FUNCTION ekm."_ekm_cluster_apply"(
	"catalog" jsonb /* pgrx :: JsonB */
) RETURNS bigint /* i64 */
STRICT VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_ekm_cluster_apply_wrapper';

CREATE FUNCTION ekm."_ekm_cluster_state"() RETURNS TEXT /* String */
STRICT VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_ekm_cluster_state_wrapper';

CREATE FUNCTION ekm."_ekm_key_worker_guard"()
	RETURNS TRIGGER
	LANGUAGE c
	AS 'MODULE_PATHNAME', '_ekm_key_worker_guard_wrapper';

CREATE FUNCTION ekm."_ekm_key_cluster"()
	RETURNS TRIGGER
	LANGUAGE c
	AS 'MODULE_PATHNAME', '_ekm_key_cluster_wrapper';

REVOKE ALL ON FUNCTION @extschema@.ekm_cluster_sync(), ekm._ekm_cluster_apply(jsonb), ekm._ekm_cluster_state(),
    ekm._ekm_key_worker_guard(), ekm._ekm_key_cluster() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.ekm_cluster_sync(), ekm._ekm_cluster_state() TO ekm_admin;

-- Citus (docs/design.md, section 9): on a worker node only the coordinator's
-- catalog changes the keys; on the coordinator every key change goes to the
-- worker nodes at commit, in the same distributed transaction.
CREATE TRIGGER key_worker_guard BEFORE INSERT OR DELETE OR UPDATE OF rotation_status ON ekm.key
    FOR EACH ROW EXECUTE FUNCTION ekm._ekm_key_worker_guard();
CREATE TRIGGER key_material_worker_guard BEFORE INSERT OR DELETE OR UPDATE ON ekm.key_material
    FOR EACH ROW EXECUTE FUNCTION ekm._ekm_key_worker_guard();
CREATE CONSTRAINT TRIGGER key_cluster
    AFTER INSERT OR DELETE OR UPDATE OF rotation_status, activated_at, rotated_at, retired_at, destroyed_at, bootstrap ON ekm.key
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ekm._ekm_key_cluster();
CREATE CONSTRAINT TRIGGER key_material_cluster AFTER INSERT OR DELETE OR UPDATE ON ekm.key_material
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ekm._ekm_key_cluster();
