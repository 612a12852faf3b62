-- Operations (the runbook's tasks): refusals with their SQLSTATE, the
-- health checks of a fresh database, dry runs, and who may call what.
-- Multi-session behaviour (workers, writers, restarts) is in
-- pgrx-tests/scripts/t_operations.sh.
\pset null '(null)'
CREATE TABLE ops_people (id int PRIMARY KEY, email text, age int);
INSERT INTO ops_people SELECT g, 'user' || g || '@example.com', g FROM generate_series(1, 50) g;
UPDATE ops_people SET email = ekm_encrypt(email) WHERE id <= 10;
UPDATE ops_people SET email = 'FERNET_V2:key_20250927_153045_b7c2:gAAAAA' || repeat('B', 94) WHERE id = 11;
UPDATE ops_people SET email = NULL WHERE id = 12;

-- Plaintext migration: dry run counts, refusals.
SELECT table_name, column_name, plaintext_values, encrypted_values, foreign_values, null_values, job_id
FROM ekm_encrypt_column('ops_people', 'email', 100, true);
SELECT count(*) AS registered_after_dry_run FROM ekm.registered_column;
-- the 10 encrypted values were encrypted without a context: a dry run with one says so
SELECT note FROM ekm_encrypt_column('ops_people', 'email', 100, true, 'public.ops_people.email');
-- and so does a rotation's dry run for a column registered with a context its values lack
SELECT ekm_register_column('ops_people', 'email', 'public.ops_people.email');
SELECT column_name, values_to_move, values_not_encrypted, note FROM ekm_rotate(dry_run => true);
SELECT ekm_unregister_column('ops_people', 'email');
SELECT try($$SELECT * FROM ekm_encrypt_column('ops_people', 'nope', 100, true)$$) AS missing_column;
SELECT try($$SELECT * FROM ekm_encrypt_column('ops_people', 'age', 100, false)$$) AS integer_column;
SELECT try($$SELECT * FROM ekm_encrypt_column('ops_people', 'email', 0, true)$$) AS zero_batch;

-- Rollback with keys rotating (from 01_keys) but nothing registered; cleanup with nothing to clean.
SELECT try_hint($$SELECT * FROM ekm_rollback()$$) AS rollback_nothing_registered;
SELECT try($$SELECT * FROM ekm_rollback(batch_size => 0)$$) AS rollback_zero_batch;
SELECT count(*) AS nothing_to_clean FROM ekm_cleanup_old_keys();
SELECT count(*) AS nothing_to_clean_dry FROM ekm_cleanup_old_keys(0, dry_run => true);
SELECT try($$SELECT * FROM ekm_cleanup_old_keys(-1)$$) AS negative_days;

-- A new key needs no rotation.
SELECT count(*) AS keys_needing_rotation FROM ekm_keys_needing_rotation();
SELECT next_rotation_due - rotation_alert_at AS alert_before_due FROM ekm_key_status();

-- Health: 01_keys left keys rotating by hand (warnings); nothing registered is a warning.
SELECT "check", status FROM ekm_health();
SELECT ekm_health_status();
SELECT ekm_register_column('ops_people', 'email');
SELECT "check", status, detail FROM ekm_health() WHERE "check" IN ('registered_columns', 'unusable_values', 'decrypt_keys', 'rotation_jobs', 'auto_rotation');
SELECT ekm_health_status();
SELECT ekm_unregister_column('ops_people', 'email');

-- Who may call what: ekm_user encrypts only; ekm_admin operates.
DROP ROLE IF EXISTS ekm_test_ops_app, ekm_test_ops_dba;
CREATE ROLE ekm_test_ops_app IN ROLE ekm_user;
CREATE ROLE ekm_test_ops_dba IN ROLE ekm_admin;
SET ROLE ekm_test_ops_app;
SELECT try($$SELECT * FROM ekm_health()$$) AS app_health;
SELECT try($$SELECT ekm_health_status()$$) AS app_health_status;
SELECT try($$SELECT * FROM ekm_rollback()$$) AS app_rollback;
SELECT try($$SELECT * FROM ekm_cleanup_old_keys()$$) AS app_cleanup;
SELECT try($$SELECT * FROM ekm_keys_needing_rotation()$$) AS app_keys_needing_rotation;
SELECT try($$SELECT * FROM ekm_encrypt_column('ops_people', 'email', 100, true)$$) AS app_encrypt_column;
RESET ROLE;
SET ROLE ekm_test_ops_dba;
SELECT ekm_health_status() AS dba_health_status;
SELECT count(*) AS dba_keys_needing_rotation FROM ekm_keys_needing_rotation();
SELECT count(*) AS dba_cleanup_dry_run FROM ekm_cleanup_old_keys(dry_run => true);
SELECT try($$SELECT * FROM ekm_encrypt_column('ops_people', 'email', 100, true)$$) AS dba_without_select;
RESET ROLE;
DROP TABLE ops_people;
DROP ROLE ekm_test_ops_app, ekm_test_ops_dba;
