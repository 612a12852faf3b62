//! Operations from the runbook: rollback, cleanup of old keys, health,
//! keys needing rotation, and in-place encryption of a plaintext column.
use crate::jobs::scan;
use crate::jobs::scan::{fernet_by_key, registered_columns};
use crate::jobs::start::{check_batch_size, start_job, supersede_unfinished};
use crate::jobs::worker;
use crate::keys::lifecycle::{activate, lock_key_changes};
use crate::keys::{catalog, keycache};
use crate::pg::error::{internal, refuse_on_standby};
use crate::pg::error::{raise_with, OrRaise};
use crate::pg::owner::{self, as_owner};
use crate::pg::spi;
use ekm_core::EkmError;
use pgrx::datum::TimestampWithTimeZone;
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

// ----------------------------------------------------------------- cleanup

/// Destroys (erases the material of) keys retired more than `days` ago that
/// no registered column still uses and the latest scan of the database found
/// nowhere; with `dry_run`, only reports. (Its C symbol is new in 0.2.0:
/// the 0.1.0 definition, with one argument less, must never reach it.)
#[pg_extern(volatile, name = "ekm_cleanup_old_keys")]
fn ekm_cleanup_old_keys_v2(
    days: default!(i32, 365),
    dry_run: default!(bool, false),
    force: default!(bool, false),
) -> TableIterator<
    'static,
    (
        name!(key_id, String),
        name!(retired_at, Option<TimestampWithTimeZone>),
        name!(values_in_use, i64),
        name!(action, String),
    ),
> {
    if days < 0 {
        raise_with(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("days must be 0 or more, not {days}"),
            Some("days is how long a key must have been retired before it is destroyed; 0 takes every retired key the checks allow".into()),
        );
    }
    if !dry_run {
        refuse_on_standby("destroy keys", "ekm_cleanup_old_keys()");
        crate::sql::cluster::refuse_on_cluster(
            "destroy keys",
            "ekm does not yet scan the worker nodes' shards for values on a key, so it cannot know that a key is unused on every node (dry_run => true lists what would go)",
        );
    }
    let (_, owner) = catalog::ekm_tables().or_raise();
    let rows = as_owner(owner, || cleanup(days, dry_run, force)).or_raise();
    if !dry_run && rows.iter().any(|r| r.3 == "destroyed") {
        keycache::invalidate_all();
    }
    TableIterator::new(rows)
}

type CleanupRow = (String, Option<TimestampWithTimeZone>, i64, String);

fn cleanup(days: i32, dry_run: bool, force: bool) -> EkmResult<Vec<CleanupRow>> {
    lock_key_changes()?;
    if !dry_run {
        // partitions dropped since are no longer there to count
        crate::jobs::start::sync_partitions()?;
    }
    // The candidates, locked: no activation can take them while we count.
    let candidates = Spi::connect_mut(|c| -> pgrx::spi::SpiResult<Vec<(String, Option<TimestampWithTimeZone>, bool)>> {
        let mut v = Vec::new();
        for r in c.update(
            "SELECT key_id, retired_at, kind = 'fernet' FROM ekm.key WHERE rotation_status = 'retired' \
               AND coalesce(retired_at, rotated_at, created_at) < now() - make_interval(days => $1) \
             ORDER BY key_id FOR UPDATE",
            None,
            &[days.into()],
        )? {
            v.push((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<TimestampWithTimeZone>(2)?,
                r.get::<bool>(3)?.unwrap_or(false),
            ));
        }
        Ok(v)
    })
    .map_err(internal)?;
    let fernet: Vec<bool> = candidates.iter().map(|c| c.2).collect();
    let candidates: Vec<(String, Option<TimestampWithTimeZone>)> =
        candidates.into_iter().map(|(id, at, _)| (id, at)).collect();
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    // Checked by counting, in this transaction: values on each candidate in
    // every registered column.
    let ids: Vec<String> = candidates.iter().map(|c| c.0.clone()).collect();
    let mut in_use = vec![0i64; ids.len()];
    let cols = registered_columns()?;
    // As each table's owner (security-restricted), whatever the caller may
    // read: these are counts that keep a key alive, not data for the caller.
    for (tbl, col, _, exists) in &cols {
        if !exists {
            continue;
        }
        let t = match scan::readable(*tbl, col, false)? {
            Ok(t) => t,
            Err(_) => continue, // gone meanwhile: refused below
        };
        let n = scan::census(&t, &[(col.clone(), String::new())], false)?
            .pop()
            .unwrap_or_default();
        for (k, (_, count)) in &n.by_key {
            if let Some(i) = ids.iter().position(|x| *x == k.to_string()) {
                in_use[i] += count;
            }
        }
        // Fernet values on a retired imported key: a FERNET_V2 value names
        // it; a bare token that no key still decrypting authenticates may be
        // on any of them (a retired key's material is not unwrapped to tell)
        for (k, count) in &n.fernet_named {
            if let Some(i) = ids.iter().position(|x| x == k) {
                in_use[i] += count;
            }
        }
        for (i, is_fernet) in fernet.iter().enumerate() {
            if *is_fernet {
                in_use[i] += n.fernet_bare_unattributed;
            }
        }
    }
    if cols.iter().any(|c| !c.3) {
        raise_with(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "a registered column no longer exists, so ekm cannot check that no value uses the keys to destroy".into(),
            Some("see SELECT * FROM ekm_health() and unregister the column with ekm_unregister_column".into()),
        );
    }
    let mut out = Vec::new();
    for ((id, retired_at), n) in candidates.into_iter().zip(in_use) {
        // Registered columns are not the whole database: a copy in another
        // column, an audit table, a materialized view would be lost with
        // the key. A scan of the database (ekm_scan_database) that started
        // after the key was retired must have found none of it.
        let unscanned = if n > 0 { None } else { scan_verdict(&id)? };
        let action = if n > 0 {
            if !dry_run {
                pgrx::warning!(
                    "ekm: key {id} is kept: {n} values in registered columns still use it"
                );
            }
            format!("kept: {n} values in registered columns still use it")
        } else if unscanned.is_some() && !force {
            let why = unscanned.expect("some");
            if !dry_run {
                pgrx::warning!("ekm: key {id} is kept: {why}");
            }
            format!("kept: {why}")
        } else if dry_run {
            match unscanned {
                Some(why) => format!("would destroy (forced: {why})"),
                None => "would destroy".to_string(),
            }
        } else {
            if let Some(why) = &unscanned {
                pgrx::warning!("ekm: key {id} is destroyed with force => true although {why}");
                catalog::audit(
                    "key_destroy_forced",
                    Some(&id),
                    &catalog::json_object(&[("reason", why)]),
                )?;
            }
            spi::exec(
                "UPDATE ekm.key_material SET wrapped = NULL WHERE key_id = $1",
                vec![id.clone().into()],
            )?;
            spi::exec(
                "UPDATE ekm.key SET rotation_status = 'destroyed', destroyed_at = now() WHERE key_id = $1",
                vec![id.clone().into()],
            )?;
            catalog::audit(
                "key_material_erased",
                Some(&id),
                &catalog::json_object(&[
                    ("retired_more_than_days", &days.to_string()),
                    ("values_in_registered_columns", "0"),
                ]),
            )?;
            "destroyed".to_string()
        };
        out.push((id, retired_at, n, action));
    }
    Ok(out)
}

/// Why a key no registered column uses must not be destroyed yet, from the
/// scans of the database: none started after it was retired, or the latest
/// such scan found values on it (and where). None: the scan found none.
fn scan_verdict(key_id: &str) -> EkmResult<Option<String>> {
    let (scan, at) = spi::two::<i64, String>(
        "SELECT j.job_id, to_char(j.finished_at, 'YYYY-MM-DD HH24:MI:SS TZ') FROM ekm.rotation_job j, ekm.key k \
         WHERE k.key_id = $1 AND j.kind = 'scan' AND j.state = 'done' \
           AND j.switched_at > coalesce(k.retired_at, k.rotated_at, k.created_at) \
         ORDER BY j.job_id DESC LIMIT 1",
        vec![key_id.into()],
    )?;
    let Some(scan) = scan else {
        return Ok(Some(
            "no scan of the database has run since it was retired: SELECT ekm_scan_database(), then clean up".into(),
        ));
    };
    let found = spi::one::<String>(
        "SELECT string_agg(s.tbl::text || '.' || pg_catalog.quote_ident(s.col) || ': ' || s.values, ', ' ORDER BY s.tbl::text, s.col) \
         FROM ekm.ciphertext_scan s WHERE s.job_id = $1 AND s.key_id = $2",
        vec![scan.into(), key_id.into()],
    )?;
    let at = at.unwrap_or_default();
    // Every reason, in one sentence each: values found; tables the scan
    // could not read (foreign tables, whose rows live on another server,
    // and tables whose owner may not read them); bare Fernet tokens it
    // could not attribute.
    let mut why: Vec<String> = Vec::new();
    if let Some(f) = found {
        why.push(format!(
            "the scan of the database finished {at} found values on it in {f} (register those columns and rotate, or delete the values)"
        ));
    }
    let (foreign, unreadable) = spi::two::<String, String>(
        "SELECT string_agg(DISTINCT s.tbl::text, ', ') FILTER (WHERE s.key_id = $2), \
                string_agg(DISTINCT s.tbl::text, ', ') FILTER (WHERE s.key_id = $3) \
         FROM ekm.ciphertext_scan s WHERE s.job_id = $1",
        vec![
            scan.into(),
            crate::jobs::scan::NOT_SCANNED_FOREIGN.into(),
            crate::jobs::scan::NOT_SCANNED_UNREADABLE.into(),
        ],
    )?;
    let citus = spi::one::<String>(
        "SELECT string_agg(DISTINCT s.tbl::text, ', ') FROM ekm.ciphertext_scan s WHERE s.job_id = $1 AND s.key_id = $2",
        vec![scan.into(), crate::jobs::scan::NOT_SCANNED_CITUS.into()],
    )?;
    if let Some(f) = citus {
        why.push(format!(
            "the scan of the database finished {at} did not read the Citus tables {f} (their rows are in shards on the worker nodes), which may hold values on it"
        ));
    }
    if let Some(f) = foreign {
        why.push(format!(
            "the scan of the database finished {at} could not read the foreign tables {f} (their rows are stored on another server), which may hold values on it: \
             check them there, then clean up with force => true"
        ));
    }
    if let Some(f) = unreadable {
        why.push(format!(
            "the scan of the database finished {at} could not read {f} (the owner may not SELECT it; ekm reads tables as their owner), which may hold values on it: \
             grant the owner SELECT and scan again, or check them yourself and clean up with force => true"
        ));
    }
    // An imported Fernet key: bare tokens the scan could not attribute (no
    // imported key that may decrypt authenticates them) may be on it.
    let unattributed = spi::one::<String>(
        "SELECT string_agg(s.tbl::text || '.' || pg_catalog.quote_ident(s.col) || ': ' || s.values, ', ' ORDER BY s.tbl::text, s.col) \
         FROM ekm.ciphertext_scan s WHERE s.job_id = $1 AND s.key_id = $2 \
           AND EXISTS (SELECT 1 FROM ekm.key k WHERE k.key_id = $3 AND k.kind = 'fernet')",
        vec![
            scan.into(),
            crate::jobs::batchfn::FERNET_UNATTRIBUTED.into(),
            key_id.into(),
        ],
    )?;
    if let Some(f) = unattributed {
        why.push(format!(
            "the scan of the database finished {at} found bare Fernet tokens that no imported key still decrypting authenticates, which may be on it, in {f} (register those columns and rotate while their key is rotating, or delete the values)"
        ));
    }
    Ok((!why.is_empty()).then(|| why.join("; ")))
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
