-- The per-row functions, written against the V1 call convention (src/fastpath.rs).
CREATE FUNCTION @extschema@.ekm_encrypt(plaintext text) RETURNS text
    AS 'MODULE_PATHNAME', 'ekm_encrypt_v1' LANGUAGE c VOLATILE STRICT PARALLEL SAFE;
CREATE FUNCTION @extschema@.ekm_encrypt(plaintext text, context text) RETURNS text
    AS 'MODULE_PATHNAME', 'ekm_encrypt_v1' LANGUAGE c VOLATILE CALLED ON NULL INPUT PARALLEL SAFE;
CREATE FUNCTION @extschema@.ekm_decrypt(ciphertext text) RETURNS text
    AS 'MODULE_PATHNAME', 'ekm_decrypt_v1' LANGUAGE c STABLE STRICT PARALLEL SAFE;
CREATE FUNCTION @extschema@.ekm_decrypt(ciphertext text, context text) RETURNS text
    AS 'MODULE_PATHNAME', 'ekm_decrypt_v1' LANGUAGE c STABLE CALLED ON NULL INPUT PARALLEL SAFE;
-- The rotation worker's per-value functions are not part of the extension:
-- each worker creates them in its own temporary schema (src/worker.rs,
-- create_batch_functions), because its batches run as each table's owner.
COMMENT ON FUNCTION @extschema@.ekm_encrypt(text) IS 'Encrypts under the active ekm key (AES-256-GCM).';
COMMENT ON FUNCTION @extschema@.ekm_encrypt(text, text) IS 'Encrypts under the active ekm key, bound to a context (associated data).';
COMMENT ON FUNCTION @extschema@.ekm_decrypt(text) IS 'Decrypts an ekm ciphertext with the key it names.';
COMMENT ON FUNCTION @extschema@.ekm_decrypt(text, text) IS 'Decrypts an ekm ciphertext that was bound to a context.';

-- Key table guards: lifecycle transitions and audit, cache invalidation,
-- and exactly one active key at every commit.
CREATE TRIGGER key_restore BEFORE INSERT ON ekm.key
    FOR EACH ROW WHEN (NEW.rotation_status = 'active') EXECUTE FUNCTION ekm._ekm_key_restore();
CREATE TRIGGER key_transition BEFORE UPDATE ON ekm.key
    FOR EACH ROW EXECUTE FUNCTION ekm._ekm_key_transition();
CREATE TRIGGER key_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON ekm.key
    FOR EACH STATEMENT EXECUTE FUNCTION ekm._ekm_key_changed();

-- SECURITY DEFINER: a deferred trigger runs as whoever commits (e.g. ekm_admin).
CREATE FUNCTION ekm._ekm_check_one_active() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF (SELECT count(*) FROM ekm.key WHERE rotation_status = 'active') <> 1
       AND EXISTS (SELECT 1 FROM ekm.key) THEN
        RAISE EXCEPTION 'ekm needs exactly one active key'
            USING ERRCODE = '23514',
                  HINT = 'activate a key with SELECT ekm_activate_key(key_id)';
    END IF;
    RETURN NULL;
END
$$;
CREATE CONSTRAINT TRIGGER key_exactly_one_active AFTER INSERT OR UPDATE OR DELETE ON ekm.key
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ekm._ekm_check_one_active();

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

-- Key metadata for psql and monitoring: never the material.
CREATE VIEW ekm.keys AS
SELECT k.key_id, k.rotation_status, k.is_active,
       k.created_at, k.activated_at, k.rotated_at, k.retired_at, k.destroyed_at,
       p.expires_at, p.age_days, p.expires_in_days, p.needs_rotation, p.rotation_due_at,
       p.encryptions,
       -- which master key wrapped it (its check value: names the key, never reveals it)
       encode(m.master_kcv, 'hex') AS master_key_fingerprint,
       -- ekm, or fernet (imported with ekm_import_fernet_key: decrypt only)
       k.kind
FROM ekm.key k
LEFT JOIN ekm.key_material m USING (key_id)
CROSS JOIN LATERAL ekm._ekm_key_policy(k.key_id, k.created_at, k.encryptions) p
ORDER BY k.created_at, k.key_id;
COMMENT ON VIEW ekm.keys IS 'ekm keys: state, dates, policy (needs_rotation) and encryption counts.';

-- Rotation: registered columns, progress.
CREATE FUNCTION @extschema@.ekm_register_column(tbl regclass, col name, context text DEFAULT NULL)
    RETURNS text LANGUAGE sql VOLATILE
    AS $$ SELECT ekm._ekm_register_column(tbl::oid, col::text, context) $$;
COMMENT ON FUNCTION @extschema@.ekm_register_column(regclass, name, text) IS
    'Registers an encrypted column for rotation, with the context its values are bound to.';
CREATE FUNCTION @extschema@.ekm_unregister_column(tbl regclass, col name)
    RETURNS text LANGUAGE sql VOLATILE
    AS $$ SELECT ekm._ekm_unregister_column(tbl::oid, col::text) $$;

CREATE VIEW ekm.registered_columns AS
SELECT r.tbl AS table_name, r.col AS column_name, r.context, r.registered_at, r.registered_by,
       k.key_id, k.key_state, k.values
FROM ekm.registered_column r
CROSS JOIN LATERAL ekm._ekm_column_key_counts(r.tbl::oid, r.col::text) k;
COMMENT ON VIEW ekm.registered_columns IS 'Registered columns with the number of values on each key (scans the tables).';

CREATE VIEW ekm.rotation_progress AS
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

-- Where the latest scan of the database (ekm_scan_database) found ekm
-- ciphertexts: every text-like column of every table, registered or not.
CREATE VIEW ekm.ciphertext_locations AS
SELECT s.job_id AS scan_job, s.tbl AS table_name, s.col AS column_name,
       EXISTS (SELECT 1 FROM ekm.registered_column r WHERE r.tbl = s.tbl AND r.col = s.col) AS registered,
       s.key_id, k.rotation_status AS key_state, s.values, s.scanned_at
FROM ekm.ciphertext_scan s
LEFT JOIN ekm.key k USING (key_id)
WHERE s.job_id = (SELECT max(job_id) FROM ekm.rotation_job WHERE kind = 'scan' AND state = 'done')
ORDER BY s.tbl::text, s.col, s.key_id;
COMMENT ON VIEW ekm.ciphertext_locations IS 'ekm ciphertexts per table, column and key found by the latest ekm_scan_database(), registered or not.';

-- The values a job could not move, for ekm_admin: the row's primary key
-- (or ctid) only to a role that may SELECT the table, since ekm's check read
-- it as the table's owner.
CREATE VIEW ekm.rotation_problem AS
SELECT p.job_id, p.tbl, p.col,
       CASE WHEN pg_catalog.has_table_privilege(p.tbl, 'SELECT') THEN p.row_ref
            ELSE '(hidden: you may not read ' || p.tbl::text || ')' END AS row_ref,
       p.key_id, p.reason, p.found_at
FROM ekm.rotation_problem_row p;
COMMENT ON VIEW ekm.rotation_problem IS 'Values a rotation job could not move (they do not decrypt with their column''s context), by row; the row is shown only to roles that may read its table.';

-- The rows behind ekm.rotation_problem are ekm's own (explicitly: a
-- database updated from 0.2.0, where ekm_admin could read them, has the
-- same privileges).
REVOKE ALL ON ekm.rotation_problem_row FROM ekm_admin;

-- Plaintext migration (the runbook's migrate_secure_encryption).
CREATE FUNCTION @extschema@.ekm_encrypt_column(tbl regclass, col name, batch_size integer DEFAULT 1000,
                                               dry_run boolean DEFAULT false, context text DEFAULT NULL)
    RETURNS TABLE (job_id bigint, table_name text, column_name text, plaintext_values bigint,
                   encrypted_values bigint, foreign_values bigint, null_values bigint,
                   estimated_seconds double precision, note text)
    LANGUAGE sql VOLATILE
    AS $$ SELECT * FROM ekm._ekm_encrypt_column(tbl::oid, col::text, batch_size, dry_run, context) $$;
COMMENT ON FUNCTION @extschema@.ekm_encrypt_column(regclass, name, integer, boolean, text) IS
    'Encrypts a plaintext column in place, in batches (background worker), and registers it; dry_run counts plaintext, encrypted and foreign values.';

-- Privileges: nothing to PUBLIC. ekm_user encrypts and decrypts;
-- ekm_admin manages keys and reads metadata and the audit log.
DO $$
DECLARE f regprocedure;
BEGIN
    FOR f IN
        SELECT d.objid::regprocedure FROM pg_catalog.pg_depend d
        WHERE d.refclassid = 'pg_catalog.pg_extension'::regclass
          AND d.refobjid = (SELECT oid FROM pg_catalog.pg_extension WHERE extname = 'ekm')
          AND d.classid = 'pg_catalog.pg_proc'::regclass AND d.deptype = 'e'
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$$;

GRANT EXECUTE ON FUNCTION
    @extschema@.ekm_encrypt(text), @extschema@.ekm_encrypt(text, text),
    @extschema@.ekm_decrypt(text), @extschema@.ekm_decrypt(text, text),
    @extschema@.ekm_reencrypt(text, text), @extschema@.ekm_key_id(text),
    @extschema@.ekm_is_encrypted(text), @extschema@.ekm_fernet_token_time(text)
    TO ekm_user;
GRANT ekm_user TO ekm_admin;
GRANT EXECUTE ON FUNCTION
    @extschema@.ekm_create_key(), @extschema@.ekm_activate_key(text), @extschema@.ekm_key_status(),
    ekm._ekm_key_policy(text, timestamptz, bigint)
    TO ekm_admin;
GRANT EXECUTE ON FUNCTION
    @extschema@.ekm_register_column(regclass, name, text), @extschema@.ekm_unregister_column(regclass, name),
    ekm._ekm_register_column(oid, text, text), ekm._ekm_unregister_column(oid, text),
    ekm._ekm_column_key_counts(oid, text),
    @extschema@.ekm_rotate(integer, boolean, boolean), @extschema@.ekm_rotation_wait(bigint, double precision),
    @extschema@.ekm_rotation_cancel(bigint), @extschema@.ekm_rotation_resume(bigint),
    @extschema@.ekm_rollback(integer), @extschema@.ekm_cleanup_old_keys(integer, boolean, boolean),
    @extschema@.ekm_scan_database(integer), @extschema@.ekm_rotate_master_key(),
    @extschema@.ekm_health(), @extschema@.ekm_health_status(), @extschema@.ekm_keys_needing_rotation(),
    @extschema@.ekm_encrypt_column(regclass, name, integer, boolean, text),
    ekm._ekm_encrypt_column(oid, text, integer, boolean, text),
    @extschema@.ekm_import_fernet_key(text, text, timestamptz, text),
    @extschema@.ekm_import_fernet_keys(jsonb),
    @extschema@.ekm_cluster_sync(), ekm._ekm_cluster_state(), ekm._ekm_node_cleanup_check(text[])
    TO ekm_admin;
GRANT USAGE ON SCHEMA ekm TO ekm_admin;
GRANT SELECT ON ekm.keys, ekm.audit_log, ekm.registered_column, ekm.registered_columns,
    ekm.rotation_job, ekm.rotation_cursor, ekm.rotation_range, ekm.rotation_node, ekm.rotation_progress, ekm.rotation_problem,
    ekm.ciphertext_scan, ekm.ciphertext_locations TO ekm_admin;

-- The first key.
SELECT ekm._ekm_bootstrap_key();
