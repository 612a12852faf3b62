-- ekm 0.1.0 -> 0.2.0 (ALTER EXTENSION ekm UPDATE). Once 0.2.0 is released
-- this file is frozen: every later change to ekm's SQL objects ships a script
-- of its own (ekm--0.2.0--0.3.0.sql, ...), and the upgrade test
-- (pgrx-tests/scripts/t_upgrade.sh) compares an updated database with a
-- fresh install object by object. docs/design.md, section 7.
\echo Use "ALTER EXTENSION ekm UPDATE" to load this file. \quit

-- The rotation worker's per-value functions left the extension: each worker
-- creates them in its own temporary schema, because its batches run as each
-- table's owner (who may not execute ekm's functions). Helpers the dry runs
-- and views used are gone too: those scans read the values in Rust.
DROP FUNCTION ekm._ekm_on_rotating_key(text);
DROP FUNCTION ekm._ekm_rotate_value(text, text, integer);
DROP FUNCTION ekm._ekm_encrypt_plain(text, text, integer);
DROP FUNCTION ekm._ekm_decrypts(text, text);
DROP FUNCTION ekm._ekm_value_class(text);
DROP FUNCTION ekm._ekm_key_of(text);

-- Partitions (and inheritance children) are registered with their table.
ALTER TABLE ekm.registered_column ADD COLUMN parent regclass;
COMMENT ON TABLE ekm.registered_column IS 'Columns ekm_rotate() keeps on the active key, with the context their values are bound to; partitions of a registered table are registered with it (parent).';

-- Jobs: scans of the database (kind scan); jobs that could not move every
-- value (state needs_attention). A scan runs beside a rotation.
ALTER TABLE ekm.rotation_job DROP CONSTRAINT rotation_job_kind_check;
ALTER TABLE ekm.rotation_job ADD CONSTRAINT rotation_job_kind_check
    CHECK (kind IN ('rotate', 'rollback', 'encrypt', 'scan'));
ALTER TABLE ekm.rotation_job DROP CONSTRAINT rotation_job_state_check;
ALTER TABLE ekm.rotation_job ADD CONSTRAINT rotation_job_state_check
    CHECK (state IN ('running', 'cancelled', 'needs_attention', 'failed', 'done'));
DROP INDEX ekm.rotation_job_one_unfinished;
CREATE UNIQUE INDEX rotation_job_one_unfinished ON ekm.rotation_job ((true))
    WHERE state IN ('running', 'cancelled', 'needs_attention') AND kind <> 'scan';
CREATE UNIQUE INDEX rotation_job_one_scan ON ekm.rotation_job ((true))
    WHERE state IN ('running', 'cancelled') AND kind = 'scan';

CREATE TABLE ekm.rotation_problem (
    job_id   bigint NOT NULL REFERENCES ekm.rotation_job ON DELETE CASCADE,
    tbl      regclass NOT NULL,
    col      name NOT NULL,
    row_ref  text NOT NULL,
    key_id   text,
    reason   text NOT NULL,
    found_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, tbl, col, row_ref)
);
CREATE TABLE ekm.ciphertext_scan (
    job_id     bigint NOT NULL REFERENCES ekm.rotation_job ON DELETE CASCADE,
    tbl        regclass NOT NULL,
    col        name NOT NULL,
    key_id     text NOT NULL,
    values     bigint NOT NULL,
    scanned_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, tbl, col, key_id)
);
SELECT pg_catalog.pg_extension_config_dump('ekm.rotation_problem', '');
SELECT pg_catalog.pg_extension_config_dump('ekm.ciphertext_scan', '');

-- Progress only goes up: a later pass stays at 99.9.
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
       j.switched_at AS started_at, j.finished_at
FROM ekm.rotation_job j
JOIN ekm.rotation_cursor c USING (job_id)
CROSS JOIN LATERAL (SELECT round(j.rows_done / greatest(extract(epoch FROM coalesce(j.finished_at, now()) - j.switched_at), 0.001))::bigint
                           AS rows_per_second) r
ORDER BY j.job_id DESC, c.tbl::text, c.col;

CREATE VIEW ekm.ciphertext_locations AS
SELECT s.job_id AS scan_job, s.tbl AS table_name, s.col AS column_name,
       EXISTS (SELECT 1 FROM ekm.registered_column r WHERE r.tbl = s.tbl AND r.col = s.col) AS registered,
       s.key_id, k.rotation_status AS key_state, s.values, s.scanned_at
FROM ekm.ciphertext_scan s
LEFT JOIN ekm.key k USING (key_id)
WHERE s.job_id = (SELECT max(job_id) FROM ekm.rotation_job WHERE kind = 'scan' AND state = 'done')
ORDER BY s.tbl::text, s.col, s.key_id;
COMMENT ON VIEW ekm.ciphertext_locations IS 'ekm ciphertexts per table, column and key found by the latest ekm_scan_database(), registered or not.';

-- Cleanup keeps keys a scan of the database has not cleared (force
-- overrides). A new C symbol: the 0.1.0 definition, with one argument
-- less, must never call the new code.
DROP FUNCTION @extschema@.ekm_cleanup_old_keys(integer, boolean);
CREATE FUNCTION @extschema@."ekm_cleanup_old_keys"(
	"days" INT DEFAULT 365,
	"dry_run" bool DEFAULT false,
	"force" bool DEFAULT false
) RETURNS TABLE (
	"key_id" TEXT,
	"retired_at" timestamp with time zone,
	"values_in_use" bigint,
	"action" TEXT
)
STRICT VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'ekm_cleanup_old_keys_v2_wrapper';

CREATE FUNCTION @extschema@."ekm_scan_database"(
	"batch_size" INT DEFAULT 1000
) RETURNS TABLE (
	"job_id" bigint,
	"tables" bigint,
	"columns" bigint,
	"note" TEXT
)
STRICT VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'ekm_scan_database_wrapper';

-- Master key rotation: each wrapped key's fingerprint (the check value of
-- the master key that wrapped it) is shown; ekm_key_status() gains the
-- configured key's (a new C symbol: one column more).
--
-- Keys imported from the runbook's key store (Fernet, decrypt only) sit in
-- ekm.key with kind 'fernet' and the runbook's ids; ekm never encrypts with
-- them.
ALTER TABLE ekm.key ADD COLUMN kind text NOT NULL DEFAULT 'ekm' CHECK (kind IN ('ekm', 'fernet'));
ALTER TABLE ekm.key DROP CONSTRAINT key_key_id_check;
ALTER TABLE ekm.key ADD CONSTRAINT key_key_id_check CHECK (CASE WHEN kind = 'ekm' THEN key_id ~ '^key_[0-9]{8}_[0-9]{6}_[0-9a-f]{4}$'
                                            ELSE key_id ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$' END);
ALTER TABLE ekm.key ADD CONSTRAINT key_fernet_decrypt_only CHECK (kind = 'ekm' OR rotation_status IN ('rotating', 'retired', 'destroyed'));
CREATE OR REPLACE VIEW ekm.keys AS
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

DROP FUNCTION @extschema@.ekm_key_status();
CREATE FUNCTION @extschema@."ekm_key_status"() RETURNS TABLE (
	"current_key_id" TEXT,
	"active_keys_count" bigint,
	"decrypt_keys_count" bigint,
	"keys_with_material" bigint,
	"keys_needing_rotation" bigint,
	"current_key_age_days" bigint,
	"current_key_expires_at" timestamp with time zone,
	"current_key_encryptions" bigint,
	"next_rotation_due" timestamp with time zone,
	"rotation_alert_at" timestamp with time zone,
	"master_key_source" TEXT,
	"master_key_fingerprint" TEXT
)
STRICT STABLE
LANGUAGE c
AS 'MODULE_PATHNAME', 'ekm_key_status_v2_wrapper';

CREATE FUNCTION @extschema@."ekm_rotate_master_key"() RETURNS TABLE (
	"key_id" TEXT,
	"action" TEXT,
	"from_fingerprint" TEXT,
	"to_fingerprint" TEXT
)
STRICT VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'ekm_rotate_master_key_wrapper';

-- The lifecycle guard answers before the foreign key from key_material
-- does (an edit of a key's id is refused by ekm, with its hint).
DROP TRIGGER key_transition ON ekm.key;
CREATE TRIGGER key_transition BEFORE UPDATE ON ekm.key
    FOR EACH ROW EXECUTE FUNCTION ekm._ekm_key_transition();

-- Adopting the runbook's Fernet data: key imports, and a token's time.
CREATE FUNCTION @extschema@."ekm_import_fernet_key"(
	"key_id" TEXT,
	"fernet_key" TEXT,
	"created_at" timestamp with time zone DEFAULT NULL,
	"state" TEXT DEFAULT 'rotating'
) RETURNS TEXT
VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'ekm_import_fernet_key_wrapper';

CREATE FUNCTION @extschema@."ekm_import_fernet_keys"(
	"keys" jsonb
) RETURNS TABLE (
	"key_id" TEXT,
	"action" TEXT
)
STRICT VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'ekm_import_fernet_keys_wrapper';

CREATE FUNCTION @extschema@."ekm_fernet_token_time"(
	"value" TEXT
) RETURNS timestamp with time zone
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'ekm_fernet_token_time_wrapper';

-- Privileges, as a fresh install grants them: nothing to PUBLIC.
REVOKE ALL ON FUNCTION @extschema@.ekm_import_fernet_key(text, text, timestamptz, text),
    @extschema@.ekm_import_fernet_keys(jsonb), @extschema@.ekm_fernet_token_time(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.ekm_import_fernet_key(text, text, timestamptz, text),
    @extschema@.ekm_import_fernet_keys(jsonb) TO ekm_admin;
GRANT EXECUTE ON FUNCTION @extschema@.ekm_fernet_token_time(text) TO ekm_user;
REVOKE ALL ON FUNCTION @extschema@.ekm_cleanup_old_keys(integer, boolean, boolean),
    @extschema@.ekm_scan_database(integer), @extschema@.ekm_key_status(),
    @extschema@.ekm_rotate_master_key() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.ekm_cleanup_old_keys(integer, boolean, boolean),
    @extschema@.ekm_scan_database(integer), @extschema@.ekm_key_status(),
    @extschema@.ekm_rotate_master_key() TO ekm_admin;
GRANT SELECT ON ekm.rotation_problem, ekm.ciphertext_scan, ekm.ciphertext_locations TO ekm_admin;
