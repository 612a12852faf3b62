-- The trust boundary: nobody gains privileges through ekm. Every attack of
-- issue 10 that a regression test can run (the ones that need a reload, a
-- restart or automatic rotation are in t_master_key.sh and t_operations.sh). Each attack
-- records in sec.log who ran it and whether it became superuser; the checks
-- assert the attacker's rolsuper stays false and ekm never ran the code
-- with more than the table owner's rights.
\pset null '(null)'
DROP ROLE IF EXISTS ekm_sec_app, ekm_sec_dba;
CREATE ROLE ekm_sec_app LOGIN IN ROLE ekm_user;
CREATE ROLE ekm_sec_dba LOGIN IN ROLE ekm_admin;
SELECT count(*) AS unfinished_jobs FROM ekm.rotation_job WHERE state IN ('running', 'cancelled');

-- The application role owns its table and writes the hostile code itself.
CREATE SCHEMA sec AUTHORIZATION ekm_sec_app;
SET ROLE ekm_sec_app;
-- who: current_user; superuser: whether that role is one (is_superuser
-- shows the session's role, which for the worker stays a superuser)
CREATE TABLE sec.log (what text, who name, superuser boolean, escalated boolean);
GRANT INSERT ON sec.log TO PUBLIC;
-- Tries to make ekm_sec_app a superuser with whatever rights it runs with.
CREATE FUNCTION sec.attempt(what text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    BEGIN
        EXECUTE 'ALTER ROLE ekm_sec_app SUPERUSER';
        INSERT INTO sec.log SELECT what, current_user, rolsuper, true FROM pg_catalog.pg_roles WHERE rolname = current_user;
    EXCEPTION WHEN OTHERS THEN
        INSERT INTO sec.log SELECT what, current_user, rolsuper, false FROM pg_catalog.pg_roles WHERE rolname = current_user;
    END;
    RETURN true;
END $$;
CREATE FUNCTION sec.on_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM sec.attempt('trigger'); RETURN NEW; END $$;
CREATE FUNCTION sec.check_fn(v text) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN RETURN sec.attempt('check constraint'); END $$;
-- declared immutable (a lie PostgreSQL cannot check) so that generated
-- columns and index expressions may call it
CREATE FUNCTION sec.gen_fn(v text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN PERFORM sec.attempt('generated column'); RETURN length(v)::text; END $$;
CREATE FUNCTION sec.idx_fn(v text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN PERFORM sec.attempt('index expression'); RETURN v; END $$;
CREATE TABLE sec.people (
    id int PRIMARY KEY,
    email text CHECK (sec.check_fn(email)),
    email_len text GENERATED ALWAYS AS (sec.gen_fn(email)) STORED
);
CREATE INDEX ON sec.people ((sec.idx_fn(email)));
CREATE TRIGGER hostile BEFORE UPDATE ON sec.people FOR EACH ROW EXECUTE FUNCTION sec.on_update();
INSERT INTO sec.people (id, email)
SELECT g, ekm_encrypt('user' || g || '@example.com', 'sec.people.email') FROM generate_series(1, 20) g;
-- a view and a materialized view whose columns call the hostile code
CREATE FUNCTION sec.evil() RETURNS text LANGUAGE plpgsql AS $$
BEGIN PERFORM sec.attempt('view'); RETURN 'x'; END $$;
CREATE VIEW sec.v AS SELECT sec.evil() AS c;
CREATE MATERIALIZED VIEW sec.mv AS SELECT sec.evil() AS c WITH NO DATA;
-- the DBA may register the column (UPDATE), but not read it (no SELECT)
GRANT USAGE ON SCHEMA sec TO ekm_sec_dba;
GRANT UPDATE (email) ON sec.people TO ekm_sec_dba;
TRUNCATE sec.log;
RESET ROLE;

-- 1. Views, materialized views and other relations are refused by every
--    function that takes a relation (42809), and nothing of theirs runs.
SET ROLE ekm_sec_dba;
SELECT try_hint($$SELECT ekm_register_column('sec.v', 'c')$$) AS register_view;
SELECT try($$SELECT ekm_register_column('sec.mv', 'c')$$) AS register_matview;
SELECT try($$SELECT ekm_register_column('sec.people_pkey', 'id')$$) AS register_index;
SELECT try($$SELECT * FROM ekm_encrypt_column('sec.v', 'c', 100, true)$$) AS encrypt_view_dry_run;
SELECT try($$SELECT * FROM ekm_encrypt_column('sec.v', 'c')$$) AS encrypt_view;
SELECT try($$SELECT * FROM ekm_encrypt_column('sec.mv', 'c', 100, true)$$) AS encrypt_matview_dry_run;
SELECT try($$SELECT * FROM ekm._ekm_column_key_counts('sec.v'::regclass, 'c')$$) AS key_counts_of_view;
SELECT try($$SELECT * FROM ekm._ekm_column_key_counts('sec.mv'::regclass, 'c')$$) AS key_counts_of_matview;
SELECT try($$SELECT ekm._ekm_register_column('sec.v'::regclass, 'c', NULL)$$) AS internal_register_view;
SELECT try($$SELECT * FROM ekm._ekm_encrypt_column('sec.v'::regclass, 'c', 100, true, NULL)$$) AS internal_encrypt_view;
SELECT try($$SELECT ekm_unregister_column('sec.v', 'c')$$) AS unregister_view;
RESET ROLE;
SELECT count(*) AS view_code_ran FROM sec.log;

-- 2. Reads for a caller who may not SELECT the column: functions that exist
--    to read it refuse (42501); the views and health report it as not checked.
SET ROLE ekm_sec_dba;
SELECT ekm_register_column('sec.people', 'email', 'sec.people.email');
SELECT try_hint($$SELECT * FROM ekm_encrypt_column('sec.people', 'email', 100, true)$$) AS dry_run_without_select;
SELECT table_name, column_name, key_id, key_state, values FROM ekm.registered_columns WHERE table_name = 'sec.people'::regclass;
SELECT column_name, values_to_move, note FROM ekm_rotate(dry_run => true) WHERE table_name = 'sec.people';
SELECT status, detail LIKE '%not checked: sec.people.email (permission denied: ekm_sec_dba may not SELECT column "email" of sec.people)%' AS says_why
FROM ekm_health() WHERE "check" = 'unusable_values';
RESET ROLE;
GRANT SELECT (email) ON sec.people TO ekm_sec_dba;
SET ROLE ekm_sec_dba;
SELECT key_state, values FROM ekm.registered_columns WHERE table_name = 'sec.people'::regclass;
SELECT column_name, values_to_move, note FROM ekm_rotate(dry_run => true) WHERE table_name = 'sec.people';
SELECT plaintext_values, encrypted_values, note FROM ekm_encrypt_column('sec.people', 'email', 100, true);
RESET ROLE;
-- the reads ran as the owner: the table's code did not run, nobody escalated
SELECT count(*) AS table_code_ran_for_reads FROM sec.log;

-- 3. Shadows planted where PUBLIC may create (PostgreSQL 14 and older, or
--    clusters upgraded from one): better matches than pg_catalog's for the
--    types ekm uses. The database's search_path puts public first, which the
--    rotation worker (a superuser) picks up at connection.
CREATE TABLE public.shadow_calls (what text, who name);
GRANT INSERT ON public.shadow_calls TO PUBLIC;
CREATE FUNCTION public.quote_ident(name) RETURNS text LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.shadow_calls VALUES ('quote_ident(name)', current_user); RETURN pg_catalog.quote_ident($1::text); END $$;
CREATE FUNCTION public.regclass_eq(regclass, regclass) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.shadow_calls VALUES ('=(regclass, regclass)', current_user); RETURN $1::oid OPERATOR(pg_catalog.=) $2::oid; END $$;
CREATE OPERATOR public.= (LEFTARG = regclass, RIGHTARG = regclass, FUNCTION = public.regclass_eq);
GRANT EXECUTE ON FUNCTION public.quote_ident(name), public.regclass_eq(regclass, regclass) TO PUBLIC;
-- positive control: an unqualified call with this search_path reaches the shadows
SET search_path = public, pg_catalog;
SELECT quote_ident('x'::name) AS control_quote_ident, 'sec.people'::regclass = 'sec.people'::regclass AS control_eq;
SELECT what, count(*) AS control_calls FROM public.shadow_calls GROUP BY what ORDER BY what;
TRUNCATE public.shadow_calls;
RESET search_path;
ALTER DATABASE ekm_regress SET search_path = public, pg_catalog;

-- 4. A rotation: the batch UPDATE fires the hostile trigger, CHECK
--    constraint, generated column and index expression on every row. They
--    run as the table's owner, never as a superuser.
TRUNCATE sec.log;
SET ROLE ekm_sec_dba;
SET search_path = public, pg_catalog;
SELECT job_id AS job FROM ekm_rotate(force => true) LIMIT 1 \gset
SET client_min_messages = warning;
SELECT state, error FROM ekm_rotation_wait(:job);
RESET client_min_messages;
SELECT ekm_health_status() LIKE '%unusable_values%' AS health_flags_values;
SELECT count(*) AS columns_listed FROM ekm.registered_columns;
SELECT count(*) AS retired_keys, count(*) FILTER (WHERE action LIKE 'kept: %' OR action LIKE 'would %') AS each_with_an_action FROM ekm_cleanup_old_keys(0, dry_run => true);
RESET search_path;
RESET ROLE;
ALTER DATABASE ekm_regress RESET search_path;
SELECT rolsuper AS app_is_superuser FROM pg_roles WHERE rolname = 'ekm_sec_app';
SELECT what, who, superuser, escalated, count(*) > 0 AS ran
FROM sec.log GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4;
SELECT count(*) AS values_on_the_new_key FROM sec.people
WHERE ekm_key_id(email) = (SELECT key_id FROM ekm.keys WHERE is_active);
SELECT count(*) AS values_decrypt FROM sec.people
WHERE ekm_decrypt(email, 'sec.people.email') = 'user' || id || '@example.com';
-- no shadow was called, by the DBA's session or by the worker
SELECT what, who, count(*) FROM public.shadow_calls GROUP BY 1, 2 ORDER BY 1, 2;

-- 5. The per-value functions the batches use exist only inside a rotation
--    worker: elsewhere there is nothing to call, and ekm's own schema has none.
SELECT count(*) AS batch_functions_in_the_extension
FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.classid = 'pg_proc'::regclass AND d.deptype = 'e'
JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'ekm'
WHERE p.proname IN ('_ekm_rotate_value', '_ekm_encrypt_plain', '_ekm_on_rotating_key');
-- every SECURITY DEFINER function of ekm pins its search_path
SELECT p.oid::regprocedure AS definer_without_search_path
FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.classid = 'pg_proc'::regclass AND d.deptype = 'e'
JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'ekm'
WHERE p.prosecdef AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) c WHERE c LIKE 'search_path=%');

SELECT ekm_unregister_column('sec.people', 'email');
DROP SCHEMA sec CASCADE;
DROP TABLE public.shadow_calls;
DROP OPERATOR public.= (regclass, regclass);
DROP FUNCTION public.quote_ident(name), public.regclass_eq(regclass, regclass);
DROP OWNED BY ekm_sec_app, ekm_sec_dba;
DROP ROLE ekm_sec_app, ekm_sec_dba;
