-- ekm bootstrap: schema, roles and tables. Functions come after (pgrx),
-- then finalize.sql (views, triggers, grants, the first key).

CREATE SCHEMA IF NOT EXISTS ekm;
REVOKE ALL ON SCHEMA ekm FROM PUBLIC;

-- Roles are cluster-wide: a second database creating ekm reuses them.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'ekm_admin') THEN
        CREATE ROLE ekm_admin NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'ekm_user') THEN
        CREATE ROLE ekm_user NOLOGIN;
    END IF;
END
$$;

-- Key metadata (the runbook's EncryptionKeyMetadata). is_active is derived
-- from the state, so the two can never disagree.
CREATE TABLE ekm.key (
    key_id          text PRIMARY KEY,
    rotation_status text NOT NULL DEFAULT 'created'
                    CHECK (rotation_status IN ('created', 'active', 'rotating', 'retired', 'destroyed')),
    is_active       boolean GENERATED ALWAYS AS (rotation_status = 'active') STORED,
    created_at      timestamptz NOT NULL DEFAULT now(),
    activated_at    timestamptz,
    rotated_at      timestamptz,  -- stopped encrypting (became rotating)
    retired_at      timestamptz,
    destroyed_at    timestamptz,
    encryptions     bigint NOT NULL DEFAULT 0 CHECK (encryptions >= 0),
    -- the key CREATE EXTENSION made; while unused, a restored dump's keys replace it
    bootstrap       boolean NOT NULL DEFAULT false,
    -- ekm: an ekm data key (AES-256-GCM, ekm1: values); fernet: a key imported
    -- from the runbook's key store (ekm_import_fernet_key), decrypt only
    kind            text NOT NULL DEFAULT 'ekm' CHECK (kind IN ('ekm', 'fernet')),
    -- ekm's ids are ekm's format; imported ids are the runbook's (no ':', which
    -- ends the id in FERNET_V2:<key_id>:<token>)
    CONSTRAINT key_key_id_check CHECK (CASE WHEN kind = 'ekm' THEN key_id ~ '^key_[0-9]{8}_[0-9]{6}_[0-9a-f]{4}$'
                                            ELSE key_id ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$' END),
    -- ekm never encrypts with an imported key
    CONSTRAINT key_fernet_decrypt_only CHECK (kind = 'ekm' OR rotation_status IN ('rotating', 'retired', 'destroyed'))
);
COMMENT ON TABLE ekm.key IS 'ekm data keys: metadata only. Managed with ekm_* functions; see the ekm.keys view.';

-- At most one active key, enforced by the database itself.
CREATE UNIQUE INDEX key_one_active ON ekm.key ((true)) WHERE rotation_status = 'active';

-- Wrapped data keys (AES-256-GCM under the master key, bound to key_id and
-- kind); imported Fernet keys are wrapped the same way.
-- Readable by the owner only; NULL once the key is destroyed.
CREATE TABLE ekm.key_material (
    key_id     text PRIMARY KEY REFERENCES ekm.key (key_id),
    wrapped    bytea,
    master_kcv bytea NOT NULL
);
COMMENT ON TABLE ekm.key_material IS 'ekm wrapped data keys. Never readable by application roles.';

-- No unique constraint on id: pg_restore brings back a dump's audit rows
-- next to the rows this database already wrote (e.g. its first key's).
CREATE TABLE ekm.audit_log (
    id           bigserial,
    at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    session_role name NOT NULL DEFAULT session_user,
    acting_role  name NOT NULL DEFAULT current_user,
    event        text NOT NULL,
    key_id       text,
    detail       jsonb NOT NULL DEFAULT '{}'
);
COMMENT ON TABLE ekm.audit_log IS 'Every ekm key event: who, when, what.';
CREATE INDEX audit_log_at ON ekm.audit_log (at, id);

-- pg_dump keeps ekm's state (wrapped keys are useless without the master key).
SELECT pg_catalog.pg_extension_config_dump('ekm.key', '');
SELECT pg_catalog.pg_extension_config_dump('ekm.key_material', '');
SELECT pg_catalog.pg_extension_config_dump('ekm.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('ekm.audit_log_id_seq', '');

-- Rotation (docs/design.md section 5). Jobs and cursors are the truth: a
-- worker that dies, a cancel or a server restart leaves them consistent with
-- what its committed batches did.
CREATE TABLE ekm.registered_column (
    tbl           regclass NOT NULL,
    col           name NOT NULL,
    context       text NOT NULL DEFAULT '',
    registered_at timestamptz NOT NULL DEFAULT now(),
    registered_by name NOT NULL DEFAULT current_user,
    -- set for the partitions (and inheritance children) of a registered
    -- table, which ekm registers with it: NULL for a table registered itself
    parent        regclass,
    PRIMARY KEY (tbl, col)
);
COMMENT ON TABLE ekm.registered_column IS 'Columns ekm_rotate() keeps on the active key, with the context their values are bound to; partitions of a registered table are registered with it (parent).';

CREATE TABLE ekm.rotation_job (
    job_id       bigserial PRIMARY KEY,
    -- rotate: values on rotating keys move to the active key (ekm_rotate);
    -- rollback: the same, after the previous key became active again (ekm_rollback);
    -- encrypt: plaintext values of one column are encrypted (ekm_encrypt_column)
    -- scan: every text-like column of the database is searched for ciphertexts (ekm_scan_database)
    kind         text NOT NULL DEFAULT 'rotate' CHECK (kind IN ('rotate', 'rollback', 'encrypt', 'scan')),
    from_key     text,          -- NULL for encrypt (plaintext)
    to_key       text NOT NULL,
    -- needs_attention: the passes are over but values could not be moved
    -- (ekm.rotation_problem); the old keys stay rotating until they are fixed
    -- and the job is resumed
    state        text NOT NULL DEFAULT 'running'
                 CHECK (state IN ('running', 'cancelled', 'needs_attention', 'failed', 'done')),
    batch_size   int NOT NULL CHECK (batch_size > 0),
    requested_by name NOT NULL,
    switched_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- the switching transaction: a transaction whose xid or snapshot xmin is
    -- not newer may still hold from_key as the active key
    switch_xid   xid8 NOT NULL DEFAULT pg_current_xact_id(),
    finished_at  timestamptz,
    rows_done    bigint NOT NULL DEFAULT 0,
    error        text,
    -- what a running job waits for, when it cannot go on (e.g. transactions
    -- older than the key switch); NULL while it makes progress
    waiting_for  text,
    -- what holds its batches back (ekm.rotation_max_replica_lag,
    -- ekm.rotation_max_active_sessions, ekm.rotation_target_app_share), since when
    throttled_by    text,
    throttled_since timestamptz,
    -- vacuums run behind its batches (ekm.rotation_vacuum_growth), and why
    -- the last one could not free what they left behind, if it could not
    vacuums      int NOT NULL DEFAULT 0,
    vacuum_note  text,
    -- on a Citus worker node: the coordinator's job this node's job is part
    -- of (it moves this node's shard placements; docs/design.md, section 9)
    coordinator_job bigint,
    -- such a job passed its check and fence: the coordinator may retire
    verified_at  timestamptz
);
-- At most one unfinished job per database (scans of the database run beside them).
CREATE UNIQUE INDEX rotation_job_one_unfinished ON ekm.rotation_job ((true))
    WHERE state IN ('running', 'cancelled', 'needs_attention') AND kind <> 'scan';
CREATE UNIQUE INDEX rotation_job_one_scan ON ekm.rotation_job ((true))
    WHERE state IN ('running', 'cancelled') AND kind = 'scan';

CREATE TABLE ekm.rotation_cursor (
    job_id          bigint NOT NULL REFERENCES ekm.rotation_job ON DELETE CASCADE,
    tbl             regclass NOT NULL,
    col             name NOT NULL,
    context         text NOT NULL,
    state           text NOT NULL DEFAULT 'scanning' CHECK (state IN ('scanning', 'sweeping', 'done')),
    next_block      bigint NOT NULL DEFAULT 0,
    blocks_total    bigint NOT NULL,
    blocks_per_batch int NOT NULL,
    rows_total      bigint NOT NULL,   -- estimate at start; corrected when done
    rows_done       bigint NOT NULL DEFAULT 0,
    passes          int NOT NULL DEFAULT 1,
    skipped_locked  bigint NOT NULL DEFAULT 0,
    -- the table's size when the cursor was made (TOAST: its table and index)
    heap_bytes_before  bigint,
    toast_bytes_before bigint,
    -- where this cursor's part of its pass ends once other workers took
    -- block ranges of it (ekm.rotation_range); NULL: the end of the pass
    pass_end        bigint,
    PRIMARY KEY (job_id, tbl, col)
);

-- Block ranges of one table's pass that other workers split off a cursor
-- group or another range (ekm.rotation_workers): the columns `cols` of table
-- `tbl` from block `next_block` (the next batch) to `hi` (the first block past
-- the range). A range goes when its last batch commits; the pass ends when
-- its cursors reached their pass_end and no range is left.
CREATE TABLE ekm.rotation_range (
    job_id     bigint NOT NULL REFERENCES ekm.rotation_job ON DELETE CASCADE,
    tbl        regclass NOT NULL,
    seq        smallint NOT NULL CHECK (seq >= 0),   -- a worker's claim on it is (tbl, seq)
    cols       name[] NOT NULL,
    next_block bigint NOT NULL,
    hi         bigint NOT NULL,
    PRIMARY KEY (job_id, tbl, seq)
);

-- On the coordinator of a Citus cluster: where each worker node's part of a
-- job stands, as the coordinator last read it (docs/design.md, section 9).
CREATE TABLE ekm.rotation_node (
    job_id      bigint NOT NULL REFERENCES ekm.rotation_job ON DELETE CASCADE,
    node        text NOT NULL,              -- host:port
    -- the node's job: running, verified (passed its check and fence), done,
    -- cancelled, needs_attention, failed; or unreachable, waiting
    state       text NOT NULL,
    tables      int NOT NULL DEFAULT 0,     -- shard placements and tables it rotates
    rows_done   bigint NOT NULL DEFAULT 0,
    rows_total  bigint NOT NULL DEFAULT 0,
    percent     numeric NOT NULL DEFAULT 0,
    blocks_total bigint NOT NULL DEFAULT 0,  -- of its tables (the weight of its percent)
    waiting_for text,
    error       text,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, node)
);

-- Values a job could not move (wrong context, altered, on a key that does
-- not decrypt): the job ends needs_attention instead of failing, and says
-- where they are. Read through the view ekm.rotation_problem (finalize.sql),
-- which shows a row's primary key only to roles that may read its table.
CREATE TABLE ekm.rotation_problem_row (
    job_id   bigint NOT NULL REFERENCES ekm.rotation_job ON DELETE CASCADE,
    tbl      regclass NOT NULL,
    col      name NOT NULL,
    row_ref  text NOT NULL,      -- the primary key, as (col)=(value), or the ctid
    key_id   text,
    reason   text NOT NULL,
    found_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, tbl, col, row_ref)
);

-- What the last scans of the database found: ekm ciphertexts per table,
-- column and key, registered or not (ekm_scan_database).
CREATE TABLE ekm.ciphertext_scan (
    job_id     bigint NOT NULL REFERENCES ekm.rotation_job ON DELETE CASCADE,
    tbl        regclass NOT NULL,
    col        name NOT NULL,
    key_id     text NOT NULL,
    values     bigint NOT NULL,
    scanned_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, tbl, col, key_id)
);

SELECT pg_catalog.pg_extension_config_dump('ekm.registered_column', '');
SELECT pg_catalog.pg_extension_config_dump('ekm.rotation_problem_row', '');
SELECT pg_catalog.pg_extension_config_dump('ekm.ciphertext_scan', '');
SELECT pg_catalog.pg_extension_config_dump('ekm.rotation_job', '');
SELECT pg_catalog.pg_extension_config_dump('ekm.rotation_job_job_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('ekm.rotation_cursor', '');
SELECT pg_catalog.pg_extension_config_dump('ekm.rotation_range', '');
SELECT pg_catalog.pg_extension_config_dump('ekm.rotation_node', '');
