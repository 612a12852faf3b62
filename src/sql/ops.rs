//! Operations from the runbook: rollback (cleanup of old keys: sql::cleanup), health,
//! keys needing rotation, and in-place encryption of a plaintext column.
use crate::jobs::scan;
use crate::jobs::scan::fernet_by_key;
use crate::jobs::start::{check_batch_size, start_job, supersede_unfinished};
use crate::jobs::worker;
use crate::keys::catalog;
use crate::keys::lifecycle::{activate, lock_key_changes};
use crate::pg::error::{internal, refuse_on_standby};
use crate::pg::error::{raise_with, OrRaise};
use crate::pg::owner::{self, as_owner};
use crate::pg::spi;
use ekm_core::EkmError;
use pgrx::prelude::*;

type EkmResult<T> = ekm_core::Result<T>;

// ---------------------------------------------------------------- rollback

/// The runbook's Emergency Rollback: the previous key becomes active again
/// and a background job moves the data back to it.
#[pg_extern(volatile)]
fn ekm_rollback(
    batch_size: default!(i32, 1000),
) -> TableIterator<
    'static,
    (
        name!(job_id, i64),
        name!(from_key, String),
        name!(to_key, String),
        name!(note, String),
    ),
> {
    check_batch_size(batch_size);
    refuse_on_standby("roll keys back", "ekm_rollback()");
    let (_, owner) = catalog::ekm_tables().or_raise();
    let (job, from, to, note) = as_owner(owner, || -> EkmResult<(i64, String, String, String)> {
        lock_key_changes()?;
        // A running job is refused; an interrupted (cancelled) one is what a
        // rollback is for, so it is superseded.
        supersede_unfinished(true, "a rollback")?;
        let active = spi::one::<String>(
            "SELECT key_id FROM ekm.key WHERE rotation_status = 'active'",
            vec![],
        )?
        .ok_or(EkmError::NoActiveKey)?;
        let prev = spi::two::<String, String>(
            "SELECT k.key_id, k.rotation_status FROM ekm.key k \
             WHERE k.key_id <> $1 AND k.activated_at IS NOT NULL \
             ORDER BY k.activated_at DESC, k.key_id DESC",
            vec![active.clone().into()],
        )?;
        let (Some(prev), Some(state)) = prev else {
            raise_with(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("there is no previous key to roll back to: {active} is the only key that was ever active"),
                None,
            );
        };
        let has_material = spi::one::<bool>(
            "SELECT wrapped IS NOT NULL FROM ekm.key_material WHERE key_id = $1",
            vec![prev.clone().into()],
        )?
        .unwrap_or(false);
        if state == "destroyed" || !has_material {
            raise_with(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("the previous key {prev} was destroyed: its material is erased, so nothing can move back to it"),
                Some(format!("{active} stays active; values on {prev} can only come back from a backup taken before it was destroyed")),
            );
        }
        if spi::one::<i64>("SELECT count(*) FROM ekm.registered_column", vec![])?.unwrap_or(0) == 0 {
            raise_with(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "no column is registered, so a rollback could not move any data back".into(),
                Some(format!("register the encrypted columns first, or make {prev} active with SELECT ekm_activate_key('{prev}')")),
            );
        }
        activate(&prev)?;
        let job = start_job(
            "rollback",
            Some(&active),
            &prev,
            batch_size,
            &owner::acting_role_name(),
            None,
            &[("previous_state", &state)],
        )?;
        let (_, age, _) = crate::jobs::start::active_key_age()?;
        let mut note = format!("new writes use {prev}; the data moves back from {active}");
        if age.needs_rotation {
            note.push_str(&format!(
                "; {prev} is {} days old and due for rotation: plan a new ekm_rotate()",
                age.age_days
            ));
        }
        Ok((job, active, prev, note))
    })
    .or_raise();
    worker::launch_or_warn(job);
    TableIterator::once((job, from, to, note))
}

/// Starts a background job that reads every text-like column (text,
/// varchar, char, json, jsonb, arrays and domains of them) of every table
/// and materialized view of the database, as each table's owner, and
/// records the ekm ciphertexts it finds per table, column and key
/// (ekm.ciphertext_locations). Progress, wait, cancel and resume as for a
/// rotation; it runs beside one.
#[pg_extern(volatile)]
fn ekm_scan_database(
    batch_size: default!(i32, 1000),
) -> TableIterator<
    'static,
    (
        name!(job_id, i64),
        name!(tables, i64),
        name!(columns, i64),
        name!(note, String),
    ),
> {
    check_batch_size(batch_size);
    refuse_on_standby("scan the database", "ekm_scan_database()");
    let (_, owner) = catalog::ekm_tables().or_raise();
    let (job, tables, columns, foreign) = as_owner(owner, || -> EkmResult<(i64, i64, i64, i64)> {
        // Serialized with key changes: a key imported (retired) by a
        // transaction still open when this one starts could otherwise be
        // missed by the scan (its Fernet values are only recognised once
        // imported) while the scan, started after the key's retired_at,
        // still counted for cleanup's guard. The job's switched_at
        // (clock_timestamp()) is taken after the lock.
        crate::keys::lifecycle::lock_key_changes()?;
        // a Citus node's shard placements are tables of this database too
        // (Citus hides them from a client's catalog queries)
        if !crate::pg::citus::citus_tables()?.is_empty() {
            Spi::run("SELECT pg_catalog.set_config('citus.show_shards_for_app_name_prefixes', '*', true)")
                .map_err(internal)?;
        }
        let (running, state) = spi::two::<i64, String>(
            "SELECT job_id, state FROM ekm.rotation_job WHERE kind = 'scan' AND state IN ('running', 'cancelled')",
            vec![],
        )?;
        if let (Some(j), Some(state)) = (running, state) {
            if state == "running" {
                raise_with(
                    PgSqlErrorCode::ERRCODE_OBJECT_IN_USE,
                    format!("a scan of the database is already running (job {j})"),
                    Some(format!("follow it with SELECT * FROM ekm_rotation_wait({j})")),
                );
            }
            spi::exec(
                "UPDATE ekm.rotation_job SET state = 'failed', error = 'superseded by a new scan', finished_at = now() WHERE job_id = $1",
                vec![j.into()],
            )?;
        }
        let active = spi::one::<String>(
            "SELECT key_id FROM ekm.key WHERE rotation_status = 'active'",
            vec![],
        )?
        .ok_or(EkmError::NoActiveKey)?;
        // Citus tables on the coordinator: their rows are in shards on the
        // worker nodes, recorded as not scanned like foreign tables
        let citus_tables = crate::pg::citus::citus_tables()?;
        let job = spi::one_mut::<i64>(
            "INSERT INTO ekm.rotation_job (kind, to_key, batch_size, requested_by) VALUES ('scan', $1, $2, $3) RETURNING job_id",
            vec![active.into(), batch_size.into(), owner::acting_role_name().into()],
        )?
        .expect("returning");
        // Foreign tables store their rows on another server: they are not
        // read, but recorded as not scanned (cleanup keeps keys for them).
        let (tables, columns, foreign) = spi::three::<i64, i64, i64>(
            "WITH tt AS (SELECT t::oid AS oid FROM unnest(ARRAY['pg_catalog.text', 'pg_catalog.varchar', 'pg_catalog.bpchar', \
                                                                'pg_catalog.json', 'pg_catalog.jsonb']::pg_catalog.regtype[]) t), \
                  types AS (SELECT oid FROM tt \
                            UNION SELECT typarray FROM pg_catalog.pg_type WHERE oid IN (SELECT oid FROM tt) \
                            UNION SELECT oid FROM pg_catalog.pg_type WHERE typtype = 'd' AND typbasetype IN (SELECT oid FROM tt)), \
                  cols AS (SELECT c.oid, c.relkind, c.reltuples, c.relpages, a.attname, \
                           pg_catalog.has_column_privilege(c.relowner, c.oid, a.attname, 'SELECT') \
                             AND pg_catalog.has_column_privilege(c.relowner, c.oid, 'ctid', 'SELECT') AS owner_reads \
                    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                    JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid \
                    WHERE c.relkind IN ('r', 'm') AND c.relpersistence <> 't' AND (c.relkind <> 'm' OR c.relispopulated) \
                      AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'ekm') AND n.nspname NOT LIKE 'pg\\_toast%' \
                      AND a.attnum > 0 AND NOT a.attisdropped AND a.atttypid IN (SELECT oid FROM types)), \
                  citus AS (INSERT INTO ekm.ciphertext_scan (job_id, tbl, col, key_id, values) \
                    SELECT $1, c.oid::regclass, c.attname, $5, 0 FROM cols c WHERE c.oid = ANY ($6::pg_catalog.oid[]) \
                    RETURNING tbl), \
                  ins AS (INSERT INTO ekm.rotation_cursor (job_id, tbl, col, context, blocks_total, blocks_per_batch, rows_total) \
                    SELECT $1, c.oid::regclass, c.attname, '', pg_relation_size(c.oid) / current_setting('block_size')::bigint, \
                           CASE WHEN c.reltuples <= 0 THEN 1 \
                                ELSE greatest(1, ($2::float8 / greatest(1.0, c.reltuples / greatest(c.relpages, 1)))::int) END, \
                           greatest(c.reltuples, 0)::bigint \
                    FROM cols c WHERE c.owner_reads AND c.oid <> ALL ($6::pg_catalog.oid[]) \
                    RETURNING tbl), \
                  unreadable AS (INSERT INTO ekm.ciphertext_scan (job_id, tbl, col, key_id, values) \
                    SELECT $1, c.oid::regclass, c.attname, $4, 0 FROM cols c WHERE NOT c.owner_reads AND c.oid <> ALL ($6::pg_catalog.oid[]) \
                    RETURNING tbl), \
                  fdw AS (INSERT INTO ekm.ciphertext_scan (job_id, tbl, col, key_id, values) \
                    SELECT $1, c.oid::regclass, a.attname, $3, 0 \
                    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                    JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid \
                    WHERE c.relkind = 'f' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'ekm') \
                      AND a.attnum > 0 AND NOT a.attisdropped AND a.atttypid IN (SELECT oid FROM types) \
                    RETURNING tbl) \
             SELECT count(DISTINCT tbl), count(*), (SELECT count(DISTINCT tbl) FROM fdw) \
                    + (SELECT count(DISTINCT tbl) FROM unreadable) + (SELECT count(DISTINCT tbl) FROM citus) FROM ins",
            vec![
                job.into(),
                batch_size.into(),
                crate::jobs::scan::NOT_SCANNED_FOREIGN.into(),
                crate::jobs::scan::NOT_SCANNED_UNREADABLE.into(),
                crate::jobs::scan::NOT_SCANNED_CITUS.into(),
                citus_tables.into(),
            ],
        )?;
        crate::jobs::start::size_batches(job, batch_size)?;
        let (tables, columns, foreign) = (tables.unwrap_or(0), columns.unwrap_or(0), foreign.unwrap_or(0));
        catalog::audit(
            "database_scan_started",
            None,
            &catalog::json_object(&[
                ("job_id", &job.to_string()),
                ("tables", &tables.to_string()),
                ("columns", &columns.to_string()),
                ("foreign_tables_not_scanned", &foreign.to_string()),
            ]),
        )?;
        Ok((job, tables, columns, foreign))
    })
    .or_raise();
    worker::launch_or_warn(job);
    let mut note = format!("scanning in the background: SELECT * FROM ekm_rotation_wait({job}), then SELECT * FROM ekm.ciphertext_locations");
    if foreign > 0 {
        note.push_str(&format!(
            "; {foreign} table(s) not scanned (foreign tables, whose rows are stored on another server, Citus tables, whose rows are in shards on the worker nodes, or tables whose owner may not read them: SELECT * FROM ekm.ciphertext_locations WHERE key_id LIKE 'not scanned%'): cleanup keeps retired keys until you have checked them"
        ));
    }
    // on a Citus coordinator: every worker node scans its own database (its
    // shard placements), for cleanup (sql::cleanup)
    if crate::pg::citus::node().or_raise() == crate::pg::citus::Node::Coordinator {
        // qualified with ekm's schema (Citus created the extension there on
        // every node), whatever the workers' search_path
        let order = crate::pg::spi::one::<String>(
            "SELECT pg_catalog.format('SELECT job_id FROM %I.ekm_scan_database(%s)', n.nspname, $1) \
             FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) e.extnamespace \
             WHERE e.extname OPERATOR(pg_catalog.=) 'ekm'",
            vec![batch_size.into()],
        )
        .or_raise()
        .unwrap_or_default();
        let nodes = crate::pg::citus::read_on_workers(&order)
            .or_raise()
            .into_iter()
            .map(|(node, ok, r)| {
                if ok {
                    format!("{node} job {r}")
                } else {
                    format!("{node} not started: {r}")
                }
            })
            .collect::<Vec<_>>();
        note.push_str(&format!(
            "; each worker node scans its own database (ekm.rotation_job there): {}",
            nodes.join(", ")
        ));
    }
    TableIterator::once((job, tables, columns, note))
}

// ---------------------------------------------------- plaintext migration

type EncryptColumnRow = (
    Option<i64>,
    String,
    String,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<f64>,
    String,
);

#[pg_schema]
mod ekm {
    use super::*;

    /// The runbook's `migrate_secure_encryption`: encrypts a plaintext column in
    /// place in batches (background worker), skipping values already encrypted,
    /// and registers it. The dry run counts plaintext, encrypted and foreign values.
    #[pg_extern(volatile)]
    fn _ekm_encrypt_column(
        tbl: pg_sys::Oid,
        col: &str,
        batch_size: default!(i32, 1000),
        dry_run: default!(bool, false),
        context: default!(Option<&str>, "NULL"),
    ) -> TableIterator<
        'static,
        (
            name!(job_id, Option<i64>),
            name!(table_name, String),
            name!(column_name, String),
            name!(plaintext_values, Option<i64>),
            name!(encrypted_values, Option<i64>),
            name!(foreign_values, Option<i64>),
            name!(null_values, Option<i64>),
            name!(estimated_seconds, Option<f64>),
            name!(note, String),
        ),
    > {
        check_batch_size(batch_size);
        if !dry_run {
            refuse_on_standby("encrypt a column", "ekm_encrypt_column()");
        }
        TableIterator::once(encrypt_column(tbl, col, batch_size, dry_run, context).or_raise())
    }
}

fn encrypt_column(
    tbl: pg_sys::Oid,
    col: &str,
    batch_size: i32,
    dry_run: bool,
    context: Option<&str>,
) -> EkmResult<EncryptColumnRow> {
    // the name as the caller writes it (before the search_path changes)
    let name = owner::display_name(tbl);
    owner::with_safe_search_path(|| {
        encrypt_column_as_caller(tbl, col, batch_size, dry_run, context, name)
    })
}

fn encrypt_column_as_caller(
    tbl: pg_sys::Oid,
    col: &str,
    batch_size: i32,
    dry_run: bool,
    context: Option<&str>,
    name: String,
) -> EkmResult<EncryptColumnRow> {
    // Only ordinary and partitioned tables (42809 for a view, ...).
    let t = owner::Table::require(tbl)?;
    let (_, owner) = catalog::ekm_tables()?;
    let registered = as_owner(owner, || {
        spi::one::<String>(
            "SELECT context FROM ekm.registered_column WHERE tbl = $1::regclass AND col = $2",
            vec![tbl.into(), col.into()],
        )
    })?;
    let context = context
        .map(str::to_string)
        .or(registered)
        .unwrap_or_default();
    if dry_run {
        // Checks the column like registering would, without registering;
        // the caller must be allowed to read it.
        if scan::column_type(tbl, col)?.is_none() {
            raise_with(
                PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                format!("column \"{col}\" of {name} does not exist"),
                None,
            );
        }
        if !owner::caller_may_read(tbl, col)? {
            raise_with(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("permission denied to read column \"{col}\" of {name}"),
                Some(format!(
                    "a dry run reads the column as its table's owner for a role that may read it: GRANT SELECT ({}) ON {name} TO {}",
                    owner::quote_ident(col),
                    owner::quote_ident(&owner::acting_role_name())
                )),
            );
        }
        let census = scan::census(&t, &[(col.to_string(), context.clone())], true)?
            .pop()
            .unwrap_or_default();
        let fernet = census.count(&["fernet"]);
        let lost = census.count(&["fernet_undecryptable"]);
        let by_key = fernet_by_key(&census);
        let n = census;
        let (p, e, f, n, x) = (
            n.count(&["plaintext"]),
            n.count(&[
                "active",
                "rotating",
                "retired",
                "created",
                "destroyed",
                "unknown",
            ]),
            n.count(&["foreign", "malformed", "fernet_undecryptable"]),
            n.count(&["null"]),
            n.wrong_context,
        );
        let mut note = format!("dry run: {p} plaintext values would be encrypted");
        if fernet > 0 {
            note.push_str(&format!(
                "; {fernet} Fernet values would move onto the active key ({by_key})"
            ));
        }
        if lost > 0 {
            note.push_str(&format!(
                "; {lost} Fernet values no imported key decrypts are left as they are (ekm_rotate's check lists them in ekm.rotation_problem by row)"
            ));
        }
        if x > 0 {
            note.push_str(&format!(
                "; {x} encrypted values do not decrypt with the context '{context}' (encrypted with another context, or altered): a later rotation would stop at them"
            ));
        }
        if f > lost {
            note.push_str(&format!(
                "; {} values are another scheme's ciphertext (e.g. FERNET_V2 before its keys are imported) or malformed ekm values and are left as they are",
                f - lost
            ));
        }
        return Ok((
            None,
            name,
            col.to_string(),
            Some(p + fernet),
            Some(e),
            Some(f),
            Some(n),
            Some(p as f64 / crate::jobs::start::ESTIMATE_ROWS_PER_SECOND),
            note,
        ));
    }
    // Registering checks the column (exists, text, the caller may update it).
    crate::sql::rotation::register_as_caller(tbl, col, &context, &name)?;
    let job = as_owner(owner, || -> EkmResult<i64> {
        lock_key_changes()?;
        supersede_unfinished(false, "a column encryption")?;
        let active = spi::one::<String>(
            "SELECT key_id FROM ekm.key WHERE rotation_status = 'active'",
            vec![],
        )?
        .ok_or(EkmError::NoActiveKey)?;
        start_job(
            "encrypt",
            None,
            &active,
            batch_size,
            &owner::acting_role_name(),
            Some((tbl, col)),
            &[("table", &name), ("column", col)],
        )
    })?;
    worker::launch_or_warn(job);
    Ok((
        Some(job),
        name,
        col.to_string(),
        None,
        None,
        None,
        None,
        None,
        format!("encrypting in the background: SELECT * FROM ekm.rotation_progress WHERE job_id = {job}, or SELECT ekm_rotation_wait({job})"),
    ))
}
