-- Values that name keys this database does not have (planted, or copied
-- from another database) cost one key-cache reload per statement, not one
-- per row: a reload reads ekm.key (and, while a key's material fails to
-- unwrap, runs the master key command again), so a column of planted
-- values would otherwise cost a catalog read, or a KMS call, per row. The
-- reads of ekm.key by one statement are counted with the transaction's own
-- statistics.
CREATE TABLE planted (id int PRIMARY KEY, v text);
-- a real ciphertext with its key reference zeroed: an unknown key
INSERT INTO planted SELECT g, 'ekm1:AAAAAAAAAA' || substr(ekm_encrypt('p' || g, 'planted.v'), 16) FROM generate_series(1, 500) g;
SELECT count(*) AS planted_on_unknown_keys FROM planted WHERE ekm_key_id(v) NOT IN (SELECT key_id FROM ekm.keys);
SELECT ekm_register_column('planted', 'v', 'planted.v');
BEGIN;
CREATE TEMP TABLE before AS SELECT pg_stat_get_xact_numscans('ekm.key'::regclass) + pg_stat_get_xact_numscans('ekm.key_material'::regclass) AS n;
-- the dry run classifies every value of the column by its key
SELECT table_name, values_to_move, values_on_unusable_keys FROM ekm_rotate(dry_run => true) WHERE table_name IN ('planted', 'public.planted');
SELECT (pg_stat_get_xact_numscans('ekm.key'::regclass) + pg_stat_get_xact_numscans('ekm.key_material'::regclass) - n) < 50 AS few_key_table_reads FROM before;
ROLLBACK;
-- the batch functions and health see them the same way
SELECT status, detail LIKE '%500%' AS counts_them FROM ekm_health() WHERE "check" = 'unusable_values';
SELECT ekm_unregister_column('planted', 'v');
DROP TABLE planted;

-- ekm.rotation_problem names a row by its primary key only to roles that
-- may read the table: ekm's check reads it as the table's owner, and an
-- ekm_admin must not learn key values of rows it may not SELECT.
SET client_min_messages = warning;
CREATE TABLE secrets (id int PRIMARY KEY, v text);
INSERT INTO secrets VALUES (4242, ekm_encrypt('x', 'another context')), (1, ekm_encrypt('y', 'secrets.v'));
SELECT ekm_register_column('secrets', 'v', 'secrets.v');
SELECT job_id AS problem_job FROM ekm_rotate(force => true) LIMIT 1 \gset
SELECT state FROM ekm_rotation_wait(:problem_job, 60);
CREATE ROLE ekm_regress_blind_dba IN ROLE ekm_admin;
SET ROLE ekm_regress_blind_dba;
SELECT tbl, col, row_ref, reason LIKE '%context%' AS wrong_context FROM ekm.rotation_problem WHERE job_id = :problem_job;
SELECT try($$SELECT * FROM ekm.rotation_problem_row$$) AS the_rows_themselves;
RESET ROLE;
GRANT SELECT ON secrets TO ekm_regress_blind_dba;
SET ROLE ekm_regress_blind_dba;
SELECT tbl, col, row_ref FROM ekm.rotation_problem WHERE job_id = :problem_job;
RESET ROLE;
-- fixed and resumed, the job retires the old key
UPDATE secrets SET v = ekm_encrypt('x', 'secrets.v') WHERE id = 4242;
SELECT ekm_rotation_resume(:problem_job) LIKE '%running%' AS resumed;
SELECT state FROM ekm_rotation_wait(:problem_job, 60);
SELECT ekm_unregister_column('secrets', 'v');
DROP TABLE secrets;
DROP OWNED BY ekm_regress_blind_dba;
DROP ROLE ekm_regress_blind_dba;
RESET client_min_messages;
