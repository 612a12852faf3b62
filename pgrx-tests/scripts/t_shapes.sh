#!/usr/bin/env bash
# A table-shape matrix: one registered column on each of many table shapes
# an application may have, all owned by an ordinary application role, and
# ONE rotation over all of them. After it, as a superuser with row security
# off, every value of every shape must be on the new key, decrypt to its
# plaintext shadow, and no row may be lost. The shapes: row level security
# (enabled; enabled and forced with a tenant policy that hides every row
# from a session that set no tenant), a foreign partition (refused at
# registration, 42809), an unlogged table, a partition with another column
# order and a dropped column, a domain over text, varchar(200), a stored
# generated column computed from the encrypted one, an owner left with
# column privileges only (refused at registration, 42501), quoted
# mixed-case schema/table/column names, a
# BEFORE UPDATE trigger that changes other columns, an AFTER UPDATE audit
# trigger with unqualified names (as in PostgreSQL's documentation; and one
# whose table is found only through the owner's ALTER ROLE ... IN DATABASE
# search_path), a partition attached after registration, and a trigger
# that tries to use the worker's batch functions to mint ciphertexts.
# Phase 2 attaches a foreign partition to a registered table before a
# rotation (refused up front) and while one runs (the worker held at its
# first check): the job fails and the old key stays rotating until the
# partition is detached and the job resumed. Phase 3 forces
# ekm.batch_search_path = 'pg_catalog, pg_temp': the audit trigger's job
# fails with a hint that names the setting, and resumes once it is reset.
# Phase 4: a batch fails with an error holding a tab and a control
# character: the job ends failed, audited, not running with no worker.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib.sh"
source "$here/tap.sh"
dir=/tmp/ekm-shapes; port=61453
cleanup() { [ -n "${KEEP:-}" ] || cluster_stop "$dir" immediate >/dev/null 2>&1 || true; }
trap cleanup EXIT
cluster_start "$dir" "$port" "ekm.rotation_retry_pause = 100" "ekm.debug_pause_points = on" || exit 1
source "$here/pause.sh"

# as the superuser in database app
q() { cpsql "$dir" "$port" -d app -At -q -c "$1" 2>&1; }
# as the superuser with row security off: what the table really holds
q_all() { cpsql "$dir" "$port" -d app -At -q -c "SET row_security = off" -c "$1" 2>&1; }
# as the application role (LOGIN)
q_app() { cpsql "$dir" "$port" -d app -At -q -U app -c "$1" 2>&1; }
# with the SQLSTATE in error messages
q_verbose() { cpsql "$dir" "$port" -d app -At -q -v VERBOSITY=verbose -c "$1" 2>&1; }
q_pg() { cpsql "$dir" "$port" -d postgres -At -q -c "$1" 2>&1; }
wait_job() { [ -n "$1" ] || { echo "(no job)"; return; }; cpsql "$dir" "$port" -d app -At -q -c "SET client_min_messages = warning" -c "SELECT state FROM ekm_rotation_wait($1, $2)" 2>&1; }
active() { q "SELECT key_id FROM ekm.keys WHERE is_active"; }
key_state() { q "SELECT rotation_status FROM ekm.keys WHERE key_id = '$1'"; }
# setup LABEL: runs the SQL on stdin as the superuser in app (psql variable
# :port set), stops at the first error; a counted check that it worked
setup() {
  local out
  if out=$(cpsql "$dir" "$port" -d app -At -q -v port="$port" 2>&1); then
    ok "setup: $1"
  else
    not_ok "setup: $1: $(printf '%s' "$out" | tail -n 5 | tr '\n' ' ')"
  fi
}
# register LABEL TABLE COLUMN CONTEXT: as the superuser
register() {
  check_match "$1: ekm_register_column($2, $3) registers it" \
    "$(q "SELECT ekm_register_column('$2', '$3', '$4')")" '^registered '
}
# census TABLE COLUMN SHADOW CONTEXT: rows, values not on the new key (the
# active key, which must be the key of the rotation: NEWKEY), values that
# do not decrypt to their shadow (a value on a key that no longer
# decrypts, retired or destroyed, counts as not decrypting)
census() {
  q_all "WITH usable AS (SELECT key_id FROM ekm.keys WHERE rotation_status IN ('active', 'rotating'))
         SELECT 'rows=' || count(*)
             || ' off_new_key=' || count(*) FILTER (WHERE ekm_key_id($2) IS DISTINCT FROM (SELECT key_id FROM ekm.keys WHERE is_active AND key_id = '$NEWKEY'))
             || ' mismatched=' || count(*) FILTER (WHERE CASE WHEN ekm_key_id($2) IN (SELECT key_id FROM usable) THEN ekm_decrypt($2, '$4') END IS DISTINCT FROM $3)
         FROM $1"
}
# rotated LABEL TABLE COLUMN SHADOW CONTEXT ROWS
rotated() {
  check "$1: rotated (every value on the new key and decrypting to its shadow, $6 rows kept)" \
    "$(census "$2" "$3" "$4" "$5")" "rows=$6 off_new_key=0 mismatched=0"
}
# job_report JOB: diagnostic lines (not counted) for a job that did not end done
job_report() {
  [ -n "$1" ] || return 0
  echo "# job $1: $(q "SELECT state || ': ' || coalesce(error, '(no error)') FROM ekm.rotation_job WHERE job_id = $1")"
  q "SELECT table_name::text || '.' || column_name || ' ' || coalesce(column_state::text, '?') FROM ekm.rotation_progress WHERE job_id = $1 ORDER BY 1" 2>&1 | sed 's/^/#   /'
}

# start_rotation: ekm_rotate(force => true); sets JOB (empty if refused),
# OUT (what ekm_rotate said) and NEWKEY (the job's new key, or "(none)")
start_rotation() {
  # what shapes 11 and 12 held before it (rows a failed earlier job
  # touched must not count for this one)
  T11_BEFORE=$(q "SELECT coalesce(sum(touches), 0) FROM t11_touch")
  AUDIT_BEFORE=$(q "SELECT count(*) FROM people_audit")
  T0=$(q "SELECT clock_timestamp()")
  OUT=$(q_verbose "SELECT job_id FROM ekm_rotate(force => true) LIMIT 1")
  JOB=$(printf '%s\n' "$OUT" | grep -E '^[0-9]+$' | head -n 1)
  NEWKEY='(none)'
  [ -z "$JOB" ] || NEWKEY=$(q "SELECT to_key FROM ekm.rotation_job WHERE job_id = $JOB")
}
# culprit_of ERROR: the registered table (the one registered itself: a
# partition's parent) whose name, or a partition's, the error's first line
# holds (the longest such name), or nothing
culprit_of() {
  local first; first=$(printf '%s\n' "$1" | head -n 1)
  q "SELECT coalesce(parent, tbl)::text || '|' || tbl::text FROM ekm.registered_column" | while IFS='|' read -r root name; do
    printf '%s\n' "$first" | grep -qF -- "$name" && printf '%d %s\n' "${#name}" "$root"
  done | sort -rn | head -n 1 | cut -d' ' -f2-
}
NEWKEY='(none)'

q_pg "CREATE DATABASE app" >/dev/null
q_pg "CREATE DATABASE remote" >/dev/null
N=300 # rows per table

setup "extension, application role app (LOGIN, ekm_user), postgres_fdw server to database remote" <<'SQL'
\set ON_ERROR_STOP 1
CREATE EXTENSION ekm;
CREATE ROLE app LOGIN IN ROLE ekm_user;
GRANT CREATE ON SCHEMA public TO app;
CREATE SCHEMA "Billing Dept" AUTHORIZATION app;
CREATE EXTENSION postgres_fdw;
CREATE SERVER remote_srv FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host '127.0.0.1', port :'port', dbname 'remote');
CREATE USER MAPPING FOR postgres SERVER remote_srv OPTIONS (user 'postgres');
CREATE USER MAPPING FOR app SERVER remote_srv OPTIONS (user 'postgres', password_required 'false');
GRANT USAGE ON FOREIGN SERVER remote_srv TO app;
SQL
check "the remote tables exist in database remote" \
  "$(cpsql "$dir" "$port" -d remote -At -q -c "CREATE TABLE remote_part (id int, v text, shadow text); CREATE TABLE remote_part2 (id int, v text, shadow text)" -c "SELECT count(*) FROM pg_class WHERE relname IN ('remote_part', 'remote_part2')" 2>&1)" 2

# ---------------------------------------------------------------- shapes
setup "shape 1: RLS enabled (not forced), a policy USING (false)" <<'SQL'
SET ROLE app;
CREATE TABLE t1_rls (id int PRIMARY KEY, v text, shadow text);
INSERT INTO t1_rls SELECT g, ekm_encrypt('rls-' || g, 'public.t1_rls.v'), 'rls-' || g FROM generate_series(1, 300) g;
ALTER TABLE t1_rls ENABLE ROW LEVEL SECURITY;
CREATE POLICY nobody ON t1_rls USING (false);
SQL

setup "shape 2: RLS enabled and forced, a tenant policy" <<'SQL'
SET ROLE app;
CREATE TABLE t2_tenant (id int PRIMARY KEY, tenant int NOT NULL, v text, shadow text);
INSERT INTO t2_tenant SELECT g, g % 5 + 1, ekm_encrypt('tenant-' || g, 'public.t2_tenant.v'), 'tenant-' || g FROM generate_series(1, 300) g;
ALTER TABLE t2_tenant ENABLE ROW LEVEL SECURITY;
ALTER TABLE t2_tenant FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON t2_tenant USING (tenant = current_setting('app.tenant', true)::int);
SQL
check "shape 2: the forced policy hides every row from its owner without app.tenant, shows a tenant's with it" \
  "$(q_app "SELECT count(*) FROM t2_tenant"):$(cpsql "$dir" "$port" -d app -At -q -U app -c "SET app.tenant = 3" -c "SELECT count(*) FROM t2_tenant" 2>&1)" "0:60"

setup "shape 3: a partitioned table with a postgres_fdw foreign partition" <<'SQL'
SET ROLE app;
CREATE TABLE pt (id int, v text, shadow text) PARTITION BY RANGE (id);
CREATE TABLE pt_local PARTITION OF pt FOR VALUES FROM (1) TO (1001);
CREATE FOREIGN TABLE pt_remote PARTITION OF pt FOR VALUES FROM (1001) TO (2001) SERVER remote_srv OPTIONS (table_name 'remote_part');
INSERT INTO pt SELECT g, ekm_encrypt('pt-' || g, 'public.pt.v'), 'pt-' || g FROM generate_series(1, 200) g;
INSERT INTO pt SELECT g, ekm_encrypt('pt-' || g, 'public.pt.v'), 'pt-' || g FROM generate_series(1001, 1100) g;
SQL
check "shape 3: the foreign partition holds encrypted values (in database remote)" \
  "$(cpsql "$dir" "$port" -d remote -At -q -c "SELECT count(*) FILTER (WHERE v LIKE 'ekm1:%') FROM remote_part" 2>&1):$(q "SELECT count(*) FROM pt")" "100:300"

setup "shape 4: an UNLOGGED table" <<'SQL'
SET ROLE app;
CREATE UNLOGGED TABLE t4_unlogged (id int PRIMARY KEY, v text, shadow text);
INSERT INTO t4_unlogged SELECT g, ekm_encrypt('unlogged-' || g, 'public.t4_unlogged.v'), 'unlogged-' || g FROM generate_series(1, 300) g;
SQL

setup "shape 5: a partition with another column order and a dropped column" <<'SQL'
SET ROLE app;
CREATE TABLE t5_parts (id int, v text, shadow text) PARTITION BY RANGE (id);
CREATE TABLE t5_p1 PARTITION OF t5_parts FOR VALUES FROM (1) TO (1001);
CREATE TABLE t5_p2 (shadow text, junk int, v text, id int);
INSERT INTO t5_p2 (id, v, shadow, junk) SELECT g, ekm_encrypt('parts-' || g, 'public.t5_parts.v'), 'parts-' || g, g FROM generate_series(1001, 1150) g;
ALTER TABLE t5_p2 DROP COLUMN junk;
ALTER TABLE t5_parts ATTACH PARTITION t5_p2 FOR VALUES FROM (1001) TO (2001);
INSERT INTO t5_parts SELECT g, ekm_encrypt('parts-' || g, 'public.t5_parts.v'), 'parts-' || g FROM generate_series(1, 150) g;
SQL
check "shape 5: the attached partition's attributes really differ from its parent's" \
  "$(q "SELECT (SELECT attnum FROM pg_attribute WHERE attrelid = 't5_p2'::regclass AND attname = 'v') <> (SELECT attnum FROM pg_attribute WHERE attrelid = 't5_parts'::regclass AND attname = 'v')
          AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 't5_p2'::regclass AND attisdropped)
          AND (SELECT count(*) FROM t5_p2) = 150 AND (SELECT count(*) FROM t5_p1) = 150")" t

setup "shape 6: a column of a domain over text with a CHECK" <<'SQL'
SET ROLE app;
CREATE DOMAIN ekm_ciphertext AS text CHECK (VALUE LIKE 'ekm1:%');
CREATE TABLE t6_domain (id int PRIMARY KEY, v ekm_ciphertext, shadow text);
INSERT INTO t6_domain SELECT g, ekm_encrypt('domain-' || g, 'public.t6_domain.v'), 'domain-' || g FROM generate_series(1, 300) g;
SQL

setup "shape 7: a varchar(200) column" <<'SQL'
SET ROLE app;
CREATE TABLE t7_varchar (id int PRIMARY KEY, v varchar(200), shadow text);
INSERT INTO t7_varchar SELECT g, ekm_encrypt('varchar-' || g, 'public.t7_varchar.v'), 'varchar-' || g FROM generate_series(1, 300) g;
SQL

setup "shape 8: a stored generated column computed from the encrypted one" <<'SQL'
SET ROLE app;
CREATE TABLE t8_generated (id int PRIMARY KEY, v text, shadow text, kid text GENERATED ALWAYS AS (ekm_key_id(v)) STORED);
INSERT INTO t8_generated (id, v, shadow) SELECT g, ekm_encrypt('generated-' || g, 'public.t8_generated.v'), 'generated-' || g FROM generate_series(1, 300) g;
SQL

setup "shape 9: an owner left with column privileges only" <<'SQL'
SET ROLE app;
CREATE TABLE t9_colpriv (id int PRIMARY KEY, v text, shadow text);
INSERT INTO t9_colpriv SELECT g, ekm_encrypt('colpriv-' || g, 'public.t9_colpriv.v'), 'colpriv-' || g FROM generate_series(1, 300) g;
RESET ROLE;
REVOKE ALL ON t9_colpriv FROM app;
GRANT SELECT (id, v, shadow), UPDATE (v) ON t9_colpriv TO app;
SQL
check "shape 9: the owner has no table privilege left, only SELECT (id, v, shadow) and UPDATE (v)" \
  "$(q "SELECT has_table_privilege('app', 't9_colpriv', 'SELECT') || ',' || has_table_privilege('app', 't9_colpriv', 'UPDATE') || ',' || has_column_privilege('app', 't9_colpriv', 'v', 'SELECT') || ',' || has_column_privilege('app', 't9_colpriv', 'v', 'UPDATE') || ',' || has_column_privilege('app', 't9_colpriv', 'shadow', 'UPDATE')")" \
  "false,false,true,true,false"

setup "shape 10: quoted mixed-case schema, table and column names" <<'SQL'
SET ROLE app;
CREATE TABLE "Billing Dept"."Card Holders" ("Holder Id" int PRIMARY KEY, "Card No" text, "Card Shadow" text);
INSERT INTO "Billing Dept"."Card Holders" SELECT g, ekm_encrypt('card-' || g, 'Billing Dept.Card Holders.Card No'), 'card-' || g FROM generate_series(1, 300) g;
SQL

setup "shape 11: a BEFORE UPDATE trigger that changes other columns" <<'SQL'
SET ROLE app;
CREATE TABLE t11_touch (id int PRIMARY KEY, v text, shadow text, updated_at timestamptz, touches int NOT NULL DEFAULT 0);
CREATE FUNCTION t11_touch_fn() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.updated_at := clock_timestamp();
  NEW.touches := OLD.touches + 1;
  RETURN NEW;
END $$;
CREATE TRIGGER t11_touch BEFORE UPDATE ON t11_touch FOR EACH ROW EXECUTE FUNCTION t11_touch_fn();
INSERT INTO t11_touch (id, v, shadow) SELECT g, ekm_encrypt('touch-' || g, 'public.t11_touch.v'), 'touch-' || g FROM generate_series(1, 300) g;
SQL

# PostgreSQL's documentation (plpgsql-trigger.html, "A PL/pgSQL Trigger
# Function for Auditing"), with the names unqualified as there
setup "shape 12: an AFTER UPDATE audit trigger with unqualified names" <<'SQL'
SET ROLE app;
CREATE TABLE people (id int PRIMARY KEY, name text, email text, shadow text);
CREATE TABLE people_audit (
    operation   char(1)   NOT NULL,
    stamp       timestamp NOT NULL,
    userid      text      NOT NULL,
    id int, name text, email text, shadow text
);
CREATE FUNCTION process_people_audit() RETURNS TRIGGER AS $people_audit$
    BEGIN
        IF (TG_OP = 'DELETE') THEN
            INSERT INTO people_audit SELECT 'D', now(), user, OLD.*;
        ELSIF (TG_OP = 'UPDATE') THEN
            INSERT INTO people_audit SELECT 'U', now(), user, NEW.*;
        ELSIF (TG_OP = 'INSERT') THEN
            INSERT INTO people_audit SELECT 'I', now(), user, NEW.*;
        END IF;
        RETURN NULL;
    END;
$people_audit$ LANGUAGE plpgsql;
CREATE TRIGGER people_audit AFTER UPDATE ON people FOR EACH ROW EXECUTE FUNCTION process_people_audit();
INSERT INTO people SELECT g, 'person ' || g, ekm_encrypt('p' || g || '@example.com', 'public.people.email'), 'p' || g || '@example.com' FROM generate_series(1, 300) g;
SQL
check "shape 12: people_audit is in schema public, owned by app, empty before the rotation" \
  "$(q "SELECT n.nspname || ':' || pg_get_userbyid(c.relowner) || ':' || (SELECT count(*) FROM people_audit) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = 'people_audit'::regclass")" "public:app:0"

setup "shape 13: a partitioned table with 2 partitions, a third to attach after registration" <<'SQL'
SET ROLE app;
CREATE TABLE t13_late (id int, v text, shadow text) PARTITION BY RANGE (id);
CREATE TABLE t13_p1 PARTITION OF t13_late FOR VALUES FROM (1) TO (101);
CREATE TABLE t13_p2 PARTITION OF t13_late FOR VALUES FROM (101) TO (201);
INSERT INTO t13_late SELECT g, ekm_encrypt('late-' || g, 'public.t13_late.v'), 'late-' || g FROM generate_series(1, 200) g;
CREATE TABLE t13_p3 (LIKE t13_late);
INSERT INTO t13_p3 SELECT g, ekm_encrypt('late-' || g, 'public.t13_late.v'), 'late-' || g FROM generate_series(201, 300) g;
SQL

# The owner's search_path at login, from ALTER ROLE ... IN DATABASE:
# people2's audit table exists only in schema aud, which only that setting
# puts on the path.
setup "shape 12b: an audit trigger whose table only the owner's per-database search_path finds" <<'SQL'
CREATE SCHEMA aud AUTHORIZATION app;
ALTER ROLE app IN DATABASE app SET search_path = aud, "$user", public;
SET ROLE app;
CREATE TABLE aud.people2_audit (op text NOT NULL, id int, email text);
CREATE TABLE public.people2 (id int PRIMARY KEY, email text, shadow text);
CREATE FUNCTION public.people2_audit_fn() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO people2_audit VALUES ('U', NEW.id, NEW.email);
  RETURN NULL;
END $$;
CREATE TRIGGER people2_audit AFTER UPDATE ON public.people2 FOR EACH ROW EXECUTE FUNCTION public.people2_audit_fn();
INSERT INTO public.people2 SELECT g, ekm_encrypt('q' || g || '@example.com', 'public.people2.email'), 'q' || g || '@example.com' FROM generate_series(1, 300) g;
SQL

# A trigger that runs inside ekm's batches and tries the worker's own batch
# functions (whatever their signature) to encrypt a value of its choosing
# under the batch's context; what it got is recorded in t14_loot.
setup "shape 14: a trigger that tries to mint ciphertexts with the batch functions" <<'SQL'
SET ROLE app;
CREATE TABLE t14_loot (fn text, outcome text);
CREATE TABLE t14_hostile (id int PRIMARY KEY, v text, shadow text);
CREATE FUNCTION t14_mint() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE f record; got text; args text;
BEGIN
  FOR f IN SELECT p.proname, p.pronargs FROM pg_catalog.pg_proc p
           WHERE p.pronamespace = pg_catalog.pg_my_temp_schema() AND p.proname IN ('_ekm_encrypt_plain', '_ekm_rotate_value') LOOP
    args := CASE f.proname WHEN '_ekm_encrypt_plain' THEN '''chosen plaintext''' ELSE pg_catalog.quote_literal(OLD.v) END
            || ', ''public.t14_hostile.v'', 0' || CASE WHEN f.pronargs = 4 THEN ', 0' ELSE '' END;
    BEGIN
      EXECUTE format('SELECT pg_temp.%I(%s)', f.proname, args) INTO got;
      INSERT INTO public.t14_loot VALUES (f.proname, CASE WHEN got LIKE 'ekm1:%' AND got IS DISTINCT FROM OLD.v THEN 'minted' ELSE 'nothing' END);
    EXCEPTION WHEN OTHERS THEN
      INSERT INTO public.t14_loot VALUES (f.proname, 'refused ' || SQLSTATE);
    END;
  END LOOP;
  RETURN NEW;
END $$;
CREATE TRIGGER t14_mint BEFORE UPDATE ON t14_hostile FOR EACH ROW EXECUTE FUNCTION t14_mint();
INSERT INTO t14_hostile SELECT g, ekm_encrypt('hostile-' || g, 'public.t14_hostile.v'), 'hostile-' || g FROM generate_series(1, 300) g;
SQL

check "every application table is owned by app" \
  "$(q "SELECT coalesce(string_agg(c.oid::regclass::text, ',' ORDER BY c.oid::regclass::text), 'all') FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname IN ('public', 'Billing Dept') AND c.relkind IN ('r', 'p', 'f') AND pg_get_userbyid(c.relowner) <> 'app'")" all

# ---------------------------------------------------------- registration
register "shape 1 (RLS enabled)" t1_rls v public.t1_rls.v
register "shape 2 (RLS forced, tenant policy)" t2_tenant v public.t2_tenant.v
out=$(q_verbose "SELECT ekm_register_column('pt', 'v', 'public.pt.v')")
check_match "shape 3 (foreign partition): registering the partitioned table is refused with 42809, naming the foreign table" \
  "$out" '^ERROR:  42809: .*pt_remote'
check "shape 3 (foreign partition): nothing of it is registered" \
  "$(q "SELECT count(*) FROM ekm.registered_column WHERE tbl IN ('pt'::regclass, 'pt_local'::regclass, 'pt_remote'::regclass)")" 0
if ! printf '%s' "$out" | grep -q '^ERROR'; then
  # keep the rest of the matrix testable
  echo "# shape 3 was registered: unregistering it so that the one rotation tests the other shapes"
  q "SELECT ekm_unregister_column('pt', 'v')" | sed 's/^/# /'
fi
register "shape 4 (unlogged)" t4_unlogged v public.t4_unlogged.v
register "shape 5 (partition with another column order and a dropped column)" t5_parts v public.t5_parts.v
register "shape 6 (domain over text)" t6_domain v public.t6_domain.v
register "shape 7 (varchar(200))" t7_varchar v public.t7_varchar.v
register "shape 8 (stored generated column)" t8_generated v public.t8_generated.v
out=$(q_verbose "SELECT ekm_register_column('t9_colpriv', 'v', 'public.t9_colpriv.v')")
check_match "shape 9 (owner with column privileges only): registering is refused with 42501, naming the owner" \
  "$out" '^ERROR:  42501: app, the owner of (public\.)?t9_colpriv, may not read and update'
check_match "shape 9: the hint says which privileges to grant back" "$out" 'HINT:  grant them back .*GRANT SELECT \(ctid, v\), UPDATE \(v\) ON (public\.)?t9_colpriv TO app'
check "shape 9: nothing is registered" "$(q "SELECT count(*) FROM ekm.registered_column WHERE tbl = 't9_colpriv'::regclass")" 0
register "shape 10 (quoted mixed-case names)" '"Billing Dept"."Card Holders"' 'Card No' 'Billing Dept.Card Holders.Card No'
register "shape 11 (BEFORE UPDATE trigger)" t11_touch v public.t11_touch.v
register "shape 12 (audit trigger with unqualified names)" people email public.people.email
register "shape 13 (partition attached after registration)" t13_late v public.t13_late.v
register "shape 12b (the owner's per-database search_path)" people2 email public.people2.email
register "shape 14 (a trigger trying the batch functions)" t14_hostile v public.t14_hostile.v
check "shape 13: the third partition is attached after the registration" \
  "$(q "ALTER TABLE t13_late ATTACH PARTITION t13_p3 FOR VALUES FROM (201) TO (301)" && q "SELECT count(*) FROM t13_late")" 300

# ------------------------------------------------------ the one rotation
old=$(active)
check "shape 2: the dry run, read as the owner, counts every value under the forced policy" \
  "$(q "SELECT values_to_move FROM ekm_rotate(dry_run => true) WHERE table_name IN ('t2_tenant', 'public.t2_tenant')")" $N
start_rotation
check_match "one rotation over every registered shape starts" "$OUT" '^[0-9]+$'
state=$(wait_job "$JOB" 300)
check "the rotation ends done" "$state" done
[ "$state" = done ] || job_report "$JOB"
# Not counted: when the rotation is refused, or its job fails, with an
# error naming one registered table, that shape's checks below fail; it is
# unregistered and a rotation started again (at most 3 times) so that the
# checks of the other shapes still say something.
for _ in 1 2 3; do
  [ "$state" = done ] && break
  if [ -n "$JOB" ]; then err=$(q "SELECT error FROM ekm.rotation_job WHERE job_id = $JOB"); else err=$OUT; fi
  culprit=$(culprit_of "$err")
  [ -n "$culprit" ] || break
  echo "# the rotation failed on $culprit: unregistering it and rotating again for the other shapes"
  q "SELECT ekm_unregister_column('$culprit', (SELECT col FROM ekm.registered_column WHERE tbl = '$culprit'::regclass))" | sed 's/^/#   /'
  start_rotation
  state=$(wait_job "$JOB" 300)
  echo "#   rotation ${JOB:-refused: $(printf '%s' "$OUT" | head -n 1)}: ${state}"
  [ "$state" = done ] || job_report "$JOB"
done
new=$NEWKEY
check "the rotation's new key is active, the old one is retired" "$([ "$(active)" = "$new" ] && echo new):$(key_state "$old")" "new:retired"

rotated "shape 1 (RLS enabled, USING (false))" t1_rls v shadow public.t1_rls.v $N
rotated "shape 2 (RLS forced, tenant policy hiding every row)" t2_tenant v shadow public.t2_tenant.v $N
rotated "shape 4 (unlogged)" t4_unlogged v shadow public.t4_unlogged.v $N
rotated "shape 5 (partition with another column order and a dropped column)" t5_parts v shadow public.t5_parts.v $N
rotated "shape 6 (domain over text)" t6_domain v shadow public.t6_domain.v $N
rotated "shape 7 (varchar(200))" t7_varchar v shadow public.t7_varchar.v $N
rotated "shape 8 (stored generated column)" t8_generated v shadow public.t8_generated.v $N
check "shape 8: the generated column names the new key in every row" \
  "$(q "SELECT count(*) FILTER (WHERE kid = '$new') FROM t8_generated")" $N
check "shape 9: the refused table was left alone by the rotation" \
  "$(q "SELECT count(*) FILTER (WHERE ekm_key_id(v) = '$old') FROM t9_colpriv")" $N
rotated "shape 10 (quoted mixed-case names)" '"Billing Dept"."Card Holders"' '"Card No"' '"Card Shadow"' 'Billing Dept.Card Holders.Card No' $N
rotated "shape 11 (BEFORE UPDATE trigger)" t11_touch v shadow public.t11_touch.v $N
check "shape 11: the trigger ran once per row (every row stamped during the rotation, touches grew by one per row)" \
  "$(q "SELECT 'stamped=' || count(*) FILTER (WHERE updated_at >= '$T0') || ' touches_added=' || (sum(touches) - $T11_BEFORE) FROM t11_touch")" "stamped=$N touches_added=$N"
rotated "shape 12 (audit trigger with unqualified names)" people email shadow public.people.email $N
check "shape 12: the audit table got one 'U' row per rotated row, holding the row's new value" \
  "$(q "SELECT 'added=' || (count(*) - $AUDIT_BEFORE) || ' rows_with_new_value=' || count(DISTINCT a.id) FILTER (WHERE a.operation = 'U' AND a.email = p.email) || ' audit_rows_with_new_value=' || count(*) FILTER (WHERE a.operation = 'U' AND a.email = p.email) FROM people_audit a LEFT JOIN people p USING (id)")" "added=$N rows_with_new_value=$N audit_rows_with_new_value=$N"
rotated "shape 12b (the owner's per-database search_path)" people2 email shadow public.people2.email $N
check "shape 12b: its audit trigger wrote one row per rotated row into aud.people2_audit" \
  "$(q "SELECT count(*) FROM aud.people2_audit a JOIN people2 p USING (id) WHERE a.email = p.email")" $N
rotated "shape 14 (a trigger trying the batch functions)" t14_hostile v shadow public.t14_hostile.v $N
check "shape 14: the trigger found both writing batch functions, each refused it (42501), nothing minted" \
  "$(q "SELECT string_agg(DISTINCT fn || ' ' || outcome, ', ' ORDER BY fn || ' ' || outcome) FROM t14_loot")" \
  "_ekm_encrypt_plain refused 42501, _ekm_rotate_value refused 42501"
rotated "shape 13 (partition attached after registration)" t13_late v shadow public.t13_late.v $N
check "shape 13: the attached partition was registered (with its table)" \
  "$(q "SELECT count(*) || ':' || coalesce(max(parent::text), '-') FROM ekm.registered_column WHERE tbl = 't13_p3'::regclass")" "1:t13_late"
check "shape 3: the refused table was left alone by the rotation (its values still on the old key)" \
  "$(q "SELECT count(*) FILTER (WHERE ekm_key_id(v) = '$old') FROM pt")" 300
scan=$(q "SELECT job_id FROM ekm_scan_database()")
check "a scan of the database ends done" "$(wait_job "$scan" 120)" done
check "shape 2: the scan, read as the owner, finds every value under the forced policy" \
  "$(q "SELECT values FROM ekm.ciphertext_locations WHERE table_name = 't2_tenant'::regclass AND key_id = '$new'")" $N
check "shape 3: the scan records the foreign partition as not scanned" \
  "$(q "SELECT key_id || ':' || values FROM ekm.ciphertext_locations WHERE table_name = 'pt_remote'::regclass AND column_name = 'v'")" "not scanned: foreign table:0"
check "shape 9: the scan records the table its owner may not read as not scanned" \
  "$(q "SELECT key_id || ':' || values FROM ekm.ciphertext_locations WHERE table_name = 't9_colpriv'::regclass AND column_name = 'v'")" "not scanned: its owner may not read it:0"
check_match "cleanup keeps the retired key: a foreign table was not scanned (and says which)" \
  "$(q "SELECT key_id || ' ' || action FROM ekm_cleanup_old_keys(0) WHERE key_id = '$old'")" "^$old kept: .*found values on it in public\.pt_local\.v: 200 .*could not read the foreign tables .*pt_remote.*could not read .*t9_colpriv"
check "the retired key is still retired (not destroyed)" "$(key_state "$old")" retired

# --------------------- phase 2: a foreign partition attached to a registered table
setup "pt2: a partitioned table with only a local partition, registered" <<'SQL'
SET ROLE app;
CREATE TABLE pt2 (id int, v text, shadow text) PARTITION BY RANGE (id);
CREATE TABLE pt2_local PARTITION OF pt2 FOR VALUES FROM (1) TO (1001);
INSERT INTO pt2 SELECT g, ekm_encrypt('pt2-' || g, 'public.pt2.v'), 'pt2-' || g FROM generate_series(1, 300) g;
CREATE FOREIGN TABLE pt2_remote (id int, v text, shadow text) SERVER remote_srv OPTIONS (table_name 'remote_part2');
INSERT INTO pt2_remote SELECT g, ekm_encrypt('pt2-' || g, 'public.pt2.v'), 'pt2-' || g FROM generate_series(1001, 1100) g;
SQL
register "pt2 (local partition only)" pt2 v public.pt2.v
q "ALTER TABLE pt2 ATTACH PARTITION pt2_remote FOR VALUES FROM (1001) TO (2001)" >/dev/null
k1=$(active)
out=$(q_verbose "SELECT job_id FROM ekm_rotate(force => true) LIMIT 1")
check_match "pt2: with a foreign partition attached, ekm_rotate is refused up front (42809, naming it)" \
  "$out" '^ERROR:  42809: public\.pt2_remote is a foreign table \(a partition of public\.pt2\)'
check "pt2: the refusal changed nothing (the same key is active, no new job)" \
  "$(active):$(q "SELECT count(*) FROM ekm.rotation_job WHERE state = 'running'")" "$k1:0"
q "ALTER TABLE pt2 DETACH PARTITION pt2_remote" >/dev/null
# attached while a job runs: the worker is held at its first check (the
# passes are over), the partition attached, the worker let go
pause_hold app check
start_rotation
job2=$JOB
check_match "pt2: a rotation starts while no foreign partition is attached" "$OUT" '^[0-9]+$'
check "pt2: the worker reaches its first check" "$(paused_at app check)" yes
check "pt2: a foreign partition is attached while the job runs" \
  "$(q "ALTER TABLE pt2 ATTACH PARTITION pt2_remote FOR VALUES FROM (1001) TO (2001)" && q "SELECT count(*) FROM pt2")" 400
pause_release
state=$(wait_job "$job2" 120)
check "pt2: the job does not end done: it fails" "$state" failed
check_match "pt2: its error names the foreign table" \
  "$(q "SELECT error FROM ekm.rotation_job WHERE job_id = $job2")" 'pt2_remote is a foreign table'
check "pt2: the previous key is still rotating" "$(key_state "$k1")" rotating
check "pt2: the foreign partition is detached" "$(q "ALTER TABLE pt2 DETACH PARTITION pt2_remote" && echo detached)" detached
check_match "pt2: the job is resumed" "$(q "SELECT ekm_rotation_resume($job2)")" 'running'
state=$(wait_job "$job2" 120)
check "pt2: after the detach the job ends done" "$state" done
[ "$state" = done ] || job_report "$job2"
check "pt2: the previous key is retired" "$(key_state "$k1")" retired
rotated "pt2 (after the detach)" pt2 v shadow public.pt2.v $N
check "after phase 2 the matrix's shapes are on the newest key too" \
  "$(q_all "SELECT (SELECT count(*) FROM t2_tenant WHERE ekm_key_id(v) = '$NEWKEY') || ':' || (SELECT count(*) FROM people WHERE ekm_key_id(email) = '$NEWKEY')")" "$N:$N"

# --------------------- phase 3: ekm.batch_search_path forces a fixed path
q "ALTER SYSTEM SET ekm.batch_search_path = 'pg_catalog, pg_temp'" >/dev/null
q "SELECT pg_reload_conf()" >/dev/null
sleep 0.5 # the reload reaches new backends; the worker rereads it at start
k2=$(active)
start_rotation
job3=$JOB
state=$(wait_job "$job3" 120)
check "phase 3: with ekm.batch_search_path = 'pg_catalog, pg_temp' the audit trigger's table is not found: the job fails" "$state" failed
check_match "phase 3: the error says what failed and names the setting" \
  "$(q "SELECT error FROM ekm.rotation_job WHERE job_id = $job3")" 'relation "people_audit" does not exist.*ekm.batch_search_path = pg_catalog, pg_temp'
check "phase 3: the previous key is still rotating" "$(key_state "$k2")" rotating
q "ALTER SYSTEM RESET ekm.batch_search_path" >/dev/null
q "SELECT pg_reload_conf()" >/dev/null
sleep 0.5
q "SELECT ekm_rotation_resume($job3)" >/dev/null
check "phase 3: reset and resumed, the job ends done" "$(wait_job "$job3" 120)" done
rotated "phase 3: shape 12 (audit trigger)" people email shadow public.people.email $N

# --------------------- phase 4: a failing batch whose error holds control characters
# The job must end failed (with its audit entry), not stay running with no
# worker because the audit entry's JSON could not be written.
setup "phase 4: a table whose trigger raises an error with a tab and a control character" <<'SQL'
SET ROLE app;
CREATE TABLE t15_raise (id int PRIMARY KEY, v text);
CREATE FUNCTION t15_raise_fn() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION E'refused:\there\x01 by the application';
END $$;
CREATE TRIGGER t15_raise BEFORE UPDATE ON t15_raise FOR EACH ROW EXECUTE FUNCTION t15_raise_fn();
INSERT INTO t15_raise SELECT g, ekm_encrypt('raise-' || g, 'public.t15_raise.v') FROM generate_series(1, 50) g;
SQL
register "phase 4 (a trigger raising an error with control characters)" t15_raise v public.t15_raise.v
start_rotation
job4=$JOB
check "phase 4: the job ends failed" "$(wait_job "$job4" 120)" failed
check "phase 4: its error keeps the application's message, tab and all" \
  "$(q "SELECT position(E'refused:\\there\\x01 by the application' IN error) > 0 FROM ekm.rotation_job WHERE job_id = $job4")" t
check "phase 4: the failure is in the audit log, with the same error" \
  "$(q "SELECT count(*) FROM ekm.audit_log WHERE event = 'rotation_failed' AND detail->>'job_id' = '$job4' AND position(E'\\t' IN detail->>'error') > 0")" 1
check_match "phase 4: health reports the failed job (not a running one)" \
  "$(q "SELECT status || ': ' || detail FROM ekm_health() WHERE \"check\" = 'rotation_jobs'")" "^warning: job $job4 failed"

check_log_clean "$dir/server.log"
tap_done
