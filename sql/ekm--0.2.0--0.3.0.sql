-- ekm 0.2.0 -> 0.3.0 (ALTER EXTENSION ekm UPDATE). Frozen once 0.3.0 is
-- released: later changes ship a script of their own, and the upgrade test
-- (pgrx-tests/scripts/t_upgrade.sh) compares an updated database with a
-- fresh install object by object. docs/design.md, section 7.
\echo Use "ALTER EXTENSION ekm UPDATE" to load this file. \quit

-- ekm.rotation_problem told an ekm_admin the primary-key values of rows it
-- may not read (ekm's check reads them as the table's owner). The rows move
-- to ekm.rotation_problem_row (ekm's own, not granted), and
-- ekm.rotation_problem becomes a view that shows a row's primary key only to
-- a role that may SELECT its table. Names of the constraints follow the
-- table's, as a fresh install names them.
ALTER TABLE ekm.rotation_problem RENAME TO rotation_problem_row;
ALTER TABLE ekm.rotation_problem_row RENAME CONSTRAINT rotation_problem_pkey TO rotation_problem_row_pkey;
ALTER TABLE ekm.rotation_problem_row RENAME CONSTRAINT rotation_problem_job_id_fkey TO rotation_problem_row_job_id_fkey;
REVOKE ALL ON ekm.rotation_problem_row FROM ekm_admin;

CREATE VIEW ekm.rotation_problem AS
SELECT p.job_id, p.tbl, p.col,
       CASE WHEN pg_catalog.has_table_privilege(p.tbl, 'SELECT') THEN p.row_ref
            ELSE '(hidden: you may not read ' || p.tbl::text || ')' END AS row_ref,
       p.key_id, p.reason, p.found_at
FROM ekm.rotation_problem_row p;
COMMENT ON VIEW ekm.rotation_problem IS 'Values a rotation job could not move (they do not decrypt with their column''s context), by row; the row is shown only to roles that may read its table.';
GRANT SELECT ON ekm.rotation_problem TO ekm_admin;
