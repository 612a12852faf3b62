-- Roles: nothing for PUBLIC; ekm_user encrypts/decrypts; ekm_admin manages keys.
\pset null '(null)'
DROP ROLE IF EXISTS ekm_test_app, ekm_test_dba, ekm_test_nobody;
CREATE ROLE ekm_test_app LOGIN IN ROLE ekm_user;
CREATE ROLE ekm_test_dba LOGIN IN ROLE ekm_admin;
CREATE ROLE ekm_test_nobody LOGIN;

-- Nothing of ekm is executable by PUBLIC.
SELECT p.oid::regprocedure AS function_granted_to_public
FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.classid = 'pg_proc'::regclass AND d.deptype = 'e'
JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'ekm'
WHERE has_function_privilege('ekm_test_nobody', p.oid, 'EXECUTE')
ORDER BY 1;

SELECT ekm_encrypt('for the app') AS ct \gset

SET ROLE ekm_test_nobody;
SELECT try($$SELECT ekm_encrypt('x')$$) AS nobody_encrypt;
SELECT try(format('SELECT ekm_decrypt(%L)', :'ct')) AS nobody_decrypt;
SELECT try($$SELECT * FROM ekm.keys$$) AS nobody_keys;
RESET ROLE;

SET ROLE ekm_test_app;
SELECT ekm_decrypt(ekm_encrypt('app data')) AS app_round_trip,
       ekm_decrypt(:'ct') AS app_decrypts,
       ekm_key_id(:'ct') IS NOT NULL AS app_key_id,
       ekm_decrypt(ekm_reencrypt(:'ct')) AS app_reencrypt;
SELECT try($$SELECT * FROM ekm.key_material$$) AS app_material;
SELECT try($$SELECT * FROM ekm.key$$) AS app_key_table;
SELECT try($$SELECT * FROM ekm.keys$$) AS app_keys_view;
SELECT try($$SELECT * FROM ekm.audit_log$$) AS app_audit;
SELECT try($$SELECT ekm_create_key()$$) AS app_create_key;
SELECT try($$SELECT * FROM ekm_key_status()$$) AS app_status;
SELECT try($$SHOW ekm.master_key_file$$) AS app_show_key_file;
SELECT try($$SHOW ekm.master_key_command$$) AS app_show_key_command;
SELECT count(*) AS app_sees_master_key_settings FROM pg_settings WHERE name IN ('ekm.master_key_command', 'ekm.master_key_file');
SELECT try($$SET ekm.master_key_file = '/tmp/x'$$) AS app_set_key_file;
RESET ROLE;

SET ROLE ekm_test_dba;
SELECT count(*) >= 1 AS dba_reads_keys FROM ekm.keys;
SELECT count(*) >= 1 AS dba_reads_audit FROM ekm.audit_log;
SELECT current_key_id IS NOT NULL AS dba_status FROM ekm_key_status();
SELECT ekm_create_key() AS dba_key \gset
SELECT ekm_activate_key(:'dba_key') = :'dba_key' AS dba_activates;
SELECT try($$SELECT * FROM ekm.key_material$$) AS dba_material;
SELECT try($$UPDATE ekm.key SET encryptions = 0$$) AS dba_edits_key_rows;
SELECT try($$DELETE FROM ekm.audit_log$$) AS dba_deletes_audit;
SELECT ekm_decrypt(:'ct') AS dba_decrypts;
RESET ROLE;

-- The audit log names the role that acted, not the owner ekm acts as.
SELECT event, acting_role, session_role FROM ekm.audit_log WHERE acting_role = 'ekm_test_dba' ORDER BY id;

-- ekm acts as the owner with a fixed search_path: an operator planted in
-- the caller's search_path is never run with the owner's rights.
CREATE SCHEMA evil;
CREATE TABLE evil.calls (who name);
GRANT USAGE ON SCHEMA evil TO PUBLIC;
GRANT INSERT ON evil.calls TO PUBLIC;
CREATE FUNCTION evil.texteq(a text, b text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN INSERT INTO evil.calls VALUES (current_user); RETURN a OPERATOR(pg_catalog.=) b; END $$;
CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.texteq);
SET ROLE ekm_test_dba;
SET search_path = evil, pg_catalog, public;
-- positive control: with this search_path an unqualified text = text is the planted one
SELECT 'a'::text = 'a'::text AS control_equal;
SELECT ekm_activate_key(ekm_create_key()) IS NOT NULL AS dba_rotates_with_planted_operator;
SELECT current_key_id IS NOT NULL AS status_ok FROM ekm_key_status();
SELECT string_agg("check", ', ' ORDER BY "check") AS health_checks_ran FROM ekm_health();
RESET search_path;
RESET ROLE;
-- ekm never called it, as the owner or as the caller: only the control did
SELECT count(*) AS planted_operator_calls_as_owner FROM evil.calls WHERE who <> 'ekm_test_dba';
SELECT count(*) AS planted_operator_calls_in_all FROM evil.calls;
DROP SCHEMA evil CASCADE;
DROP OWNED BY ekm_test_app, ekm_test_dba, ekm_test_nobody;
DROP ROLE ekm_test_app, ekm_test_dba, ekm_test_nobody;
