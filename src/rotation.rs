//! Rotation's SQL surface: registered columns, ekm_rotate (switch + job),
//! wait / cancel / resume. The batches run in `worker.rs`.

use crate::api::{activate, create_key, ts_to_chrono};
use crate::catalog::{self, as_owner};
use crate::error::{raise_with, OrRaise};
use crate::{gucs, worker};
use ekm_core::{format, EkmError, KeyState};
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;

type EkmResult<T> = ekm_core::Result<T>;

/// Rows per second per column that the dry run's estimate assumes (measured
/// with bench/, 2 cores; see README).
pub(crate) const ESTIMATE_ROWS_PER_SECOND: f64 = 50_000.0;

fn internal(e: impl std::fmt::Display) -> EkmError {
    EkmError::Internal(e.to_string())
}

#[pg_schema]
mod ekm {
    use super::*;

    /// Whether a stored value is plaintext that ekm_encrypt_column encrypts
    /// (not NULL, not an ekm ciphertext, not another scheme's ciphertext).
    #[pg_extern(immutable, strict, parallel_safe)]
    fn _ekm_is_plaintext(value: &str) -> bool {
        !format::looks_encrypted(value) && !format::looks_foreign(value)
    }

    #[pg_extern(volatile)]
    fn _ekm_register_column(tbl: pg_sys::Oid, col: &str, context: Option<&str>) -> String {
        register(tbl, col, context.unwrap_or("")).or_raise()
    }

    #[pg_extern(volatile)]
    fn _ekm_unregister_column(tbl: pg_sys::Oid, col: &str) -> String {
        unregister(tbl, col).or_raise()
    }

    /// Values per key class in a column (a full scan, as the table's owner
    /// in a security-restricted operation), for `ekm.registered_columns`.
    /// Only tables: anything else is refused (42809). A column the caller
    /// may not SELECT (or that no longer exists) gives one row saying why it
    /// was not checked, so the view still shows every other column.
    #[pg_extern(volatile)]
    fn _ekm_column_key_counts(
        tbl: pg_sys::Oid,
        col: &str,
    ) -> TableIterator<
        'static,
        (
            name!(key_id, Option<String>),
            name!(key_state, String),
            name!(values, Option<i64>),
        ),
    > {
        let rows = catalog::with_safe_search_path(|| column_key_counts(tbl, col)).or_raise();
        TableIterator::new(rows)
    }
}

type KeyCountRow = (Option<String>, String, Option<i64>);

fn column_key_counts(tbl: pg_sys::Oid, col: &str) -> EkmResult<Vec<KeyCountRow>> {
    catalog::Table::require(tbl)?;
    let t = match crate::scan::readable(tbl, col, true)? {
        Ok(t) => t,
        Err(why) => return Ok(vec![(None, format!("not checked: {why}"), None)]),
    };
    if t.kind == 'p' {
        return Ok(vec![(
            None,
            "partitioned table: its partitions are listed with their values".into(),
            None,
        )]);
    }
    let n = crate::scan::census(&t, &[(col.to_string(), String::new())], false)?
        .pop()
        .unwrap_or_default();
    // values on keys, by key; then the other classes (null, plaintext, ...)
    let mut rows: Vec<KeyCountRow> = n
        .by_key
        .iter()
        .map(|(k, (class, count))| (Some(k.to_string()), class.to_string(), Some(*count)))
        .collect();
    for (k, count) in &n.by_fernet_key {
        rows.push((Some(k.clone()), "fernet".into(), Some(*count)));
    }
    for (class, count) in &n.by_class {
        if matches!(
            *class,
            "null" | "plaintext" | "foreign" | "malformed" | "fernet_undecryptable"
        ) {
            rows.push((None, class.to_string(), Some(*count)));
        }
    }
    Ok(rows)
}

pub(crate) fn register(tbl: pg_sys::Oid, col: &str, context: &str) -> EkmResult<String> {
    // the name as the caller writes it (before the search_path changes)
    let name = catalog::display_name(tbl);
    catalog::with_safe_search_path(|| register_as_caller(tbl, col, context, &name))
}

pub(crate) fn register_as_caller(
    tbl: pg_sys::Oid,
    col: &str,
    context: &str,
    name: &str,
) -> EkmResult<String> {
    // Only ordinary and partitioned tables (42809 for a view, ...).
    catalog::Table::require(tbl)?;
    // As the caller: the column must exist, hold text, and be theirs to update.
    match crate::scan::column_type(tbl, col)? {
        None => raise_with(
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            format!("column \"{col}\" of {name} does not exist"),
            None,
        ),
        Some((t, false)) => raise_with(
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            format!("column \"{col}\" of {name} is {t}; ekm ciphertexts are stored in text or varchar columns"),
            None,
        ),
        Some(_) => {}
    }
    let may_update = catalog::one::<bool>(
        "SELECT pg_catalog.has_column_privilege($1, $2::pg_catalog.text, 'UPDATE')",
        vec![tbl.into(), col.into()],
    )?
    .unwrap_or(false);
    if !may_update {
        raise_with(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied to register column \"{col}\" of {name}"),
            Some("registering a column needs the UPDATE privilege on it".into()),
        );
    }
    let (_, owner) = catalog::ekm_tables()?;
    as_owner(owner, || {
        // waits for a rotation's final step: a column is covered by the job
        // if it is registered before that step, and by none if after
        lock_key_changes()?;
        let existing = catalog::one::<String>(
            "SELECT context FROM ekm.registered_column WHERE tbl = $1::regclass AND col = $2",
            vec![tbl.into(), col.into()],
        )?;
        let parent = catalog::one::<String>(
            "SELECT parent::text FROM ekm.registered_column WHERE tbl = $1::regclass AND col = $2 AND parent IS NOT NULL",
            vec![tbl.into(), col.into()],
        )?;
        match existing {
            Some(c) if c == context => {
                return Ok(match parent {
                    Some(p) => format!("{name}.{col} is already registered, as a partition of {p}"),
                    None => format!("{name}.{col} is already registered"),
                })
            }
            Some(_) => raise_with(
                PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
                format!("column \"{col}\" of {name} is already registered with another context"),
                Some("its values are bound to the registered context; unregister it first if the values were re-encrypted with the new one".into()),
            ),
            None => {}
        }
        // Its partitions (and inheritance children) are registered with
        // it: one registered directly with another context is a conflict.
        if let Some(other) = catalog::one::<String>(
            "WITH RECURSIVE tree AS (SELECT inhrelid AS rel FROM pg_catalog.pg_inherits WHERE inhparent = $1 \
                                     UNION SELECT i.inhrelid FROM tree t JOIN pg_catalog.pg_inherits i ON i.inhparent = t.rel) \
             SELECT r.tbl::text FROM ekm.registered_column r JOIN tree t ON t.rel = r.tbl \
             WHERE r.col = $2 AND r.context <> $3 LIMIT 1",
            vec![tbl.into(), col.into(), context.into()],
        )? {
            raise_with(
                PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
                format!("column \"{col}\" of {other}, a partition of {name}, is registered with another context"),
                Some(format!("partitions are registered with their table: unregister {other}.{col} first, or register {name} with the same context")),
            );
        }
        catalog::exec(
            "INSERT INTO ekm.registered_column (tbl, col, context, registered_by) VALUES ($1::regclass, $2, $3, $4)",
            vec![tbl.into(), col.into(), context.into(), catalog::acting_role_name().into()],
        )?;
        sync_partitions()?;
        catalog::audit(
            "column_registered",
            None,
            &catalog::json_object(&[("table", name), ("column", col), ("context", context)]),
        )?;
        Ok(format!("registered {name}.{col}"))
    })
}

fn unregister(tbl: pg_sys::Oid, col: &str) -> EkmResult<String> {
    // the name as the caller writes it (before the search_path changes)
    let name = catalog::display_name(tbl);
    let (_, owner) = catalog::ekm_tables()?;
    as_owner(owner, || {
        lock_key_changes()?;
        if let Some(j) = catalog::one::<i64>(
            "SELECT job_id FROM ekm.rotation_job WHERE state IN ('running', 'cancelled', 'needs_attention') AND kind <> 'scan'",
            vec![],
        )? {
            raise_with(
                PgSqlErrorCode::ERRCODE_OBJECT_IN_USE,
                format!("rotation job {j} is unfinished"),
                Some(format!(
                    "wait for it (SELECT ekm_rotation_wait({j})) before unregistering columns"
                )),
            );
        }
        if let Some(parent) = catalog::one::<String>(
            "SELECT parent::text FROM ekm.registered_column WHERE tbl = $1::regclass AND col = $2 AND parent IS NOT NULL",
            vec![tbl.into(), col.into()],
        )? {
            raise_with(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("column \"{col}\" of {name} is registered as a partition of {parent}"),
                Some(format!("partitions are registered with their table: SELECT ekm_unregister_column('{parent}', '{col}')")),
            );
        }
        // the table's own registration and those of its partitions
        let n = catalog::one_mut::<i64>(
            "WITH d AS (DELETE FROM ekm.registered_column WHERE (tbl = $1::regclass OR parent = $1::regclass) AND col = $2 \
                        RETURNING parent) SELECT count(*) FILTER (WHERE parent IS NULL) FROM d",
            vec![tbl.into(), col.into()],
        )?
        .unwrap_or(0);
        if n == 0 {
            raise_with(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                format!("column \"{col}\" of {name} is not registered"),
                Some("SELECT * FROM ekm.registered_column lists the registered columns".into()),
            );
        }
        catalog::audit(
            "column_unregistered",
            None,
            &catalog::json_object(&[("table", &name), ("column", col)]),
        )?;
        Ok(format!("unregistered {name}.{col}"))
    })
}

type RotateRow = (
    Option<i64>,
    String,
    String,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<f64>,
    Option<String>,
);

/// Starts a rotation (or, with `dry_run`, reports what one would do).
#[pg_extern(volatile)]
fn ekm_rotate(
    batch_size: default!(i32, 1000),
    dry_run: default!(bool, false),
    force: default!(bool, false),
) -> TableIterator<
    'static,
    (
        name!(job_id, Option<i64>),
        name!(table_name, String),
        name!(column_name, String),
        name!(values_to_move, Option<i64>),
        name!(values_not_encrypted, Option<i64>),
        name!(values_on_unusable_keys, Option<i64>),
        name!(estimated_seconds, Option<f64>),
        name!(note, Option<String>),
    ),
> {
    TableIterator::new(rotate(batch_size, dry_run, force).or_raise())
}

pub(crate) fn check_batch_size(batch_size: i32) {
    if batch_size < 1 {
        raise_with(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("batch_size must be at least 1, not {batch_size}"),
            Some("batch_size is the number of rows per batch transaction; the default, 1000, suits most tables".into()),
        );
    }
}

pub(crate) fn refuse_on_standby(what: &str, call: &str) {
    if unsafe { pg_sys::RecoveryInProgress() } {
        raise_with(
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            format!("cannot {what} on a standby"),
            Some(format!("run {call} on the primary; the standby follows")),
        );
    }
}

/// Serializes ekm_rotate, ekm_rollback, ekm_encrypt_column, ekm_cleanup_old_keys
/// and automatic rotation within a database (until the transaction ends).
/// A lock only ekm takes (src/locks.rs), waited for at most
/// `ekm.lock_wait_timeout`.
pub(crate) fn lock_key_changes() -> EkmResult<()> {
    crate::locks::lock_xact(
        crate::locks::EkmLock::KeyChange,
        "change ekm's keys, registrations or jobs",
    );
    Ok(())
}

/// Refuses while a job runs. A cancelled job is refused too unless `force`,
/// in which case it is marked failed, superseded by `by`. As the owner.
pub(crate) fn supersede_unfinished(force: bool, by: &str) -> EkmResult<()> {
    let Some((j, state)) =
        first_job("WHERE state IN ('running', 'cancelled', 'needs_attention') AND kind <> 'scan'")?
    else {
        return Ok(());
    };
    if state == "running" {
        raise_with(
            PgSqlErrorCode::ERRCODE_OBJECT_IN_USE,
            format!("rotation job {j} is already running"),
            Some(format!("follow it with SELECT * FROM ekm.rotation_progress or SELECT ekm_rotation_wait({j}); stop it with SELECT ekm_rotation_cancel({j})")),
        );
    }
    let how = if state == "needs_attention" {
        "needs attention: some values could not be moved (SELECT * FROM ekm.rotation_problem)"
    } else {
        "was cancelled before it finished"
    };
    if !force {
        raise_with(
            PgSqlErrorCode::ERRCODE_OBJECT_IN_USE,
            format!("rotation job {j} {how}"),
            Some(if by == "a column encryption" {
                // ekm_encrypt_column has no force: the job is finished first
                format!(
                    "finish it first with SELECT ekm_rotation_resume({j}), then encrypt the column"
                )
            } else {
                format!("finish it with SELECT ekm_rotation_resume({j}), or start {by} with force => true")
            }),
        );
    }
    catalog::exec(
        "UPDATE ekm.rotation_job SET state = 'failed', error = $2, finished_at = now() WHERE job_id = $1",
        vec![j.into(), format!("superseded by {by}").into()],
    )?;
    pgrx::notice!(
        "ekm: unfinished job {j} ({state}) is superseded by {by}; its values are on keys that still decrypt and the new job moves them"
    );
    Ok(())
}

/// The active key, where it stands against the policy, and its encryptions
/// (stored plus those still in shared memory). As the owner.
pub(crate) fn active_key_age() -> EkmResult<(String, ekm_core::lifecycle::KeyAge, i64)> {
    let (active, created, stored) = catalog::three::<String, TimestampWithTimeZone, i64>(
        "SELECT key_id, created_at, encryptions FROM ekm.key WHERE rotation_status = 'active'",
        vec![],
    )?;
    let active = active.ok_or(EkmError::NoActiveKey)?;
    let created = ts_to_chrono(created.expect("not null"));
    let pending = ekm_core::KeyId::parse(&active)
        .map(|k| crate::shmem::pending(&k.to_ref()))
        .unwrap_or(0) as i64;
    let encryptions = stored.unwrap_or(0) + pending;
    let age = gucs::policy().evaluate(created, chrono::Utc::now(), encryptions);
    Ok((active, age, encryptions))
}

/// Creates a key, makes it active (the active key turns `rotating`) and
/// records the rotation job that moves the data. As the owner.
fn switch_to_new_key(
    from: &str,
    batch_size: i32,
    requested_by: &str,
    detail: &[(&str, &str)],
) -> EkmResult<(i64, ekm_core::KeyId)> {
    let new_key = create_key(KeyState::Created)?;
    activate(&new_key.to_string())?;
    let job = start_job(
        "rotate",
        Some(from),
        &new_key.to_string(),
        batch_size,
        requested_by,
        None,
        detail,
    )?;
    Ok((job, new_key))
}

/// Records a job and its cursors (every registered column, or just `only`)
/// and audits `<kind>_started`. As the owner; the caller launches the worker.
pub(crate) fn start_job(
    kind: &str,
    from_key: Option<&str>,
    to_key: &str,
    batch_size: i32,
    requested_by: &str,
    only: Option<(pg_sys::Oid, &str)>,
    detail: &[(&str, &str)],
) -> EkmResult<i64> {
    let job = catalog::one_mut::<i64>(
        "INSERT INTO ekm.rotation_job (kind, from_key, to_key, batch_size, requested_by) VALUES ($1, $2, $3, $4, $5) RETURNING job_id",
        vec![kind.into(), from_key.into(), to_key.into(), batch_size.into(), requested_by.into()],
    )?
    .expect("returning");
    sync_partitions()?;
    add_cursors(job, batch_size, only)?;
    let job_s = job.to_string();
    let bs = batch_size.to_string();
    let mut fields: Vec<(&str, &str)> = vec![
        ("job_id", &job_s),
        ("from_key", from_key.unwrap_or("plaintext")),
        ("to_key", to_key),
        ("batch_size", &bs),
        ("requested_by", requested_by),
    ];
    fields.extend_from_slice(detail);
    let event = match kind {
        "encrypt" => "column_encryption_started",
        "rollback" => "rollback_started",
        _ => "rotation_started",
    };
    catalog::audit(event, Some(to_key), &catalog::json_object(&fields))?;
    Ok(job)
}

/// Registers the partitions and inheritance children (at any depth) of
/// every registered table that are not registered yet, with the table's
/// context (`parent` names it), and forgets registrations of partitions
/// that were dropped (their values went with them). A partition detached
/// since keeps its registration. As the owner of ekm's tables; how many
/// partitions were registered.
pub(crate) fn sync_partitions() -> EkmResult<i64> {
    catalog::exec(
        "DELETE FROM ekm.registered_column r WHERE r.parent IS NOT NULL \
           AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = r.tbl)",
        vec![],
    )?;
    refuse_rows_stored_elsewhere()?;
    refuse_owner_without_privileges()?;
    Ok(catalog::one_mut::<i64>(
        "WITH RECURSIVE tree AS ( \
           SELECT r.tbl::oid AS root, r.col, r.context, r.registered_by, i.inhrelid AS rel \
           FROM ekm.registered_column r JOIN pg_catalog.pg_inherits i ON i.inhparent = r.tbl \
           WHERE r.parent IS NULL \
           UNION \
           SELECT t.root, t.col, t.context, t.registered_by, i.inhrelid FROM tree t JOIN pg_catalog.pg_inherits i ON i.inhparent = t.rel), \
         ins AS (INSERT INTO ekm.registered_column (tbl, col, context, registered_by, parent) \
           SELECT t.rel::regclass, t.col, t.context, t.registered_by, t.root::regclass FROM tree t \
           WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a WHERE a.attrelid = t.rel AND a.attname = t.col AND NOT a.attisdropped) \
           ON CONFLICT (tbl, col) DO NOTHING RETURNING 1) \
         SELECT count(*) FROM ins",
        vec![],
    )?
    .unwrap_or(0))
}

/// Refuses (42809) while a registered table has a partition or inheritance
/// child, at any depth, that does not store its rows in this database's
/// own tables (a foreign table), or while a relation registered in
/// ekm.registered_column is not a table: ekm's batches and checks cannot
/// read or write it, and a job that skipped it would retire a key its
/// values are still on. Runs at registration, at the start of every job and
/// in every settle step, and again under the key-change lock before a
/// retire (sync_partitions), so a foreign partition attached at any time
/// fails the job instead of letting it end `done`.
fn refuse_rows_stored_elsewhere() -> EkmResult<()> {
    let (member, root, partition) = catalog::three::<pg_sys::Oid, pg_sys::Oid, bool>(
        "WITH RECURSIVE tree AS ( \
           SELECT r.tbl::oid AS root, i.inhrelid AS rel FROM ekm.registered_column r \
           JOIN pg_catalog.pg_inherits i ON i.inhparent = r.tbl WHERE r.parent IS NULL \
           UNION \
           SELECT t.root, i.inhrelid FROM tree t JOIN pg_catalog.pg_inherits i ON i.inhparent = t.rel), \
         m AS (SELECT rel, root FROM tree UNION ALL SELECT r.tbl::oid, coalesce(r.parent, r.tbl)::oid FROM ekm.registered_column r) \
         SELECT m.rel, m.root, c.relispartition FROM m JOIN pg_catalog.pg_class c ON c.oid = m.rel \
         WHERE c.relkind NOT IN ('r', 'p') ORDER BY m.root, m.rel LIMIT 1",
        vec![],
    )?;
    let (Some(member), Some(root)) = (member, root) else {
        return Ok(());
    };
    let kind = catalog::Table::lookup(member).map_or("a relation", |t| t.kind_name());
    Err(EkmError::NotStoredHere {
        member: catalog::display_name(member),
        kind,
        how: if member == root {
            "registered in"
        } else if partition.unwrap_or(false) {
            "a partition of"
        } else {
            "an inheritance child of"
        },
        table: if member == root {
            "ekm.registered_column".into()
        } else {
            catalog::display_name(root)
        },
    })
}

/// Refuses (42501) while the owner of a registered table may not read and
/// update what ekm's batches read and update as that owner: the column
/// (SELECT, UPDATE) and the row addresses (SELECT on `ctid`), e.g. after
/// `REVOKE ALL ON t FROM owner` left it column privileges only. Checked
/// with every sync (registration, the start of each job, every settle step,
/// the final step), so such a table is refused up front or fails the job
/// before a key is retired, never skipped.
fn refuse_owner_without_privileges() -> EkmResult<()> {
    let (tbl, col, owner) = catalog::three::<pg_sys::Oid, String, String>(
        "SELECT r.tbl::oid, r.col::text, pg_catalog.pg_get_userbyid(c.relowner)::text \
         FROM ekm.registered_column r JOIN pg_catalog.pg_class c ON c.oid = r.tbl \
         JOIN pg_catalog.pg_attribute a ON a.attrelid = r.tbl AND a.attname = r.col AND NOT a.attisdropped \
         WHERE c.relkind = 'r' \
           AND NOT (pg_catalog.has_column_privilege(c.relowner, r.tbl, a.attnum, 'SELECT') \
                    AND pg_catalog.has_column_privilege(c.relowner, r.tbl, a.attnum, 'UPDATE') \
                    AND pg_catalog.has_column_privilege(c.relowner, r.tbl, (-1)::pg_catalog.int2, 'SELECT')) \
         ORDER BY r.tbl::oid, r.col LIMIT 1",
        vec![],
    )?;
    let (Some(tbl), Some(col), Some(owner)) = (tbl, col, owner) else {
        return Ok(());
    };
    let name = catalog::display_name(tbl);
    let (q_owner, q_col) = (catalog::quote_ident(&owner), catalog::quote_ident(&col));
    raise_with(
        PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
        format!(
            "{owner}, the owner of {name}, may not read and update {name}.{q_col}: ekm reads and rewrites registered columns as the table's owner"
        ),
        Some(format!(
            "grant them back (GRANT SELECT, UPDATE ON {name} TO {q_owner}, or at least GRANT SELECT (ctid, {q_col}), UPDATE ({q_col}) ON {name} TO {q_owner}); nothing was registered or retired"
        )),
    )
}

/// Gives every registered column of an ordinary table (partitioned tables
/// hold no rows: their partitions are registered tables of their own) that
/// has no cursor in job `job` one (with `only`, just that registration and
/// its partitions). Batches cover `batch_size` rows: the blocks per batch
/// come from the table's row density (sampled for a table never analyzed).
/// As the owner of ekm's tables; how many cursors were added.
pub(crate) fn add_cursors(
    job: i64,
    batch_size: i32,
    only: Option<(pg_sys::Oid, &str)>,
) -> EkmResult<i64> {
    let (tbl, col) = only.map_or((None, None), |(t, c)| (Some(t), Some(c.to_string())));
    let added = catalog::one_mut::<i64>(
        "WITH a AS (INSERT INTO ekm.rotation_cursor (job_id, tbl, col, context, blocks_total, blocks_per_batch, rows_total) \
           SELECT $1, r.tbl, r.col, r.context, \
                  pg_relation_size(r.tbl) / current_setting('block_size')::bigint, \
                  CASE WHEN c.reltuples < 0 THEN 1 \
                       ELSE greatest(1, ($2::float8 / greatest(1.0, c.reltuples / greatest(c.relpages, 1)))::int) END, \
                  greatest(c.reltuples, 0)::bigint \
           FROM ekm.registered_column r JOIN pg_catalog.pg_class c ON c.oid = r.tbl \
           WHERE c.relkind = 'r' \
             AND ($3::oid IS NULL OR ((r.tbl = $3::oid OR r.parent = $3::oid) AND r.col = $4)) \
             AND NOT EXISTS (SELECT 1 FROM ekm.rotation_cursor x WHERE x.job_id = $1 AND x.tbl = r.tbl AND x.col = r.col) \
           RETURNING tbl) \
         SELECT count(*) FROM a",
        vec![job.into(), batch_size.into(), tbl.into(), col.into()],
    )?
    .unwrap_or(0);
    size_batches(job, batch_size)?;
    Ok(added)
}

/// Tables never analyzed (reltuples < 0) have no row density: for the
/// job's cursors that have not started, the first blocks are sampled (as the
/// table's owner), or a batch would span batch_size blocks instead of rows.
pub(crate) fn size_batches(job: i64, batch_size: i32) -> EkmResult<()> {
    let unknown = Spi::connect(|c| -> pgrx::spi::SpiResult<Vec<(pg_sys::Oid, i64)>> {
        let mut v = Vec::new();
        for r in c.select(
            "SELECT DISTINCT c.tbl::oid, c.blocks_total FROM ekm.rotation_cursor c JOIN pg_catalog.pg_class p ON p.oid = c.tbl \
             WHERE c.job_id = $1 AND p.reltuples < 0 AND c.blocks_total > 0 AND c.rows_done = 0 AND c.passes = 1 AND c.next_block = 0",
            None,
            &[job.into()],
        )? {
            v.push((r.get::<pg_sys::Oid>(1)?.unwrap_or_default(), r.get::<i64>(2)?.unwrap_or(0)));
        }
        Ok(v)
    })
    .map_err(internal)?;
    for (t, blocks) in unknown {
        let sample = blocks.min(32);
        // read as the table's owner, like every statement on an application table
        let table = catalog::Table::require(t)?;
        let rows = table
            .as_owner(|| {
                catalog::one::<i64>(
                    &format!(
                        "SELECT pg_catalog.count(*) FROM ONLY {} WHERE ctid OPERATOR(pg_catalog.<) $1::pg_catalog.tid",
                        table.qualified
                    ),
                    vec![format!("({sample},0)").into()],
                )
            })?
            .unwrap_or(0);
        let per_block = (rows as f64 / sample as f64).max(1.0);
        catalog::exec(
            "UPDATE ekm.rotation_cursor SET blocks_per_batch = greatest(1, ($3::float8 / $4::float8)::int), \
                    rows_total = ($4::float8 * blocks_total)::bigint \
             WHERE job_id = $1 AND tbl = $2::regclass AND rows_done = 0 AND passes = 1 AND next_block = 0",
            vec![job.into(), t.into(), (batch_size as f64).into(), per_block.into()],
        )?;
    }
    Ok(())
}

fn rotate(batch_size: i32, dry_run: bool, force: bool) -> EkmResult<Vec<RotateRow>> {
    check_batch_size(batch_size);
    refuse_on_standby("rotate keys", "ekm_rotate()");
    let (_, owner) = catalog::ekm_tables()?;
    let (job, rows) = as_owner(owner, || -> EkmResult<(Option<i64>, Vec<RotateRow>)> {
        lock_key_changes()?;
        let cols = Spi::connect(|c| -> pgrx::spi::SpiResult<Vec<(pg_sys::Oid, String, String, String)>> {
            let mut v = Vec::new();
            for r in c.select("SELECT tbl::oid, tbl::text, col::text, context FROM ekm.registered_column ORDER BY 2, 3", None, &[])? {
                v.push((
                    r.get::<pg_sys::Oid>(1)?.unwrap_or_default(),
                    r.get::<String>(2)?.unwrap_or_default(),
                    r.get::<String>(3)?.unwrap_or_default(),
                    r.get::<String>(4)?.unwrap_or_default(),
                ));
            }
            Ok(v)
        })
        .map_err(internal)?;
        if cols.is_empty() {
            raise_with(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "no column is registered for rotation".into(),
                Some("register the encrypted columns first: SELECT ekm_register_column('people', 'email', 'public.people.email')".into()),
            );
        }
        if dry_run {
            let mut out = Vec::new();
            for (oid, tname, col, context) in &cols {
                // read as the table's owner, for a caller who may read the column
                let t = match crate::scan::readable(*oid, col, true)? {
                    Ok(t) => t,
                    Err(why) => {
                        out.push((
                            None,
                            tname.clone(),
                            col.clone(),
                            None,
                            None,
                            None,
                            None,
                            Some(format!("not checked: {why}")),
                        ));
                        continue;
                    }
                };
                if t.kind == 'p' {
                    out.push((
                        None,
                        tname.clone(),
                        col.clone(),
                        None,
                        None,
                        None,
                        None,
                        Some("partitioned table: its partitions are listed".into()),
                    ));
                    continue;
                }
                let n = crate::scan::census(&t, &[(col.clone(), context.clone())], true)?
                    .pop()
                    .unwrap_or_default();
                let (m, p, u, x) = (
                    n.count(&["active", "rotating", "fernet"]),
                    n.count(&["plaintext", "foreign"]),
                    n.count(&[
                        "unknown",
                        "retired",
                        "destroyed",
                        "created",
                        "malformed",
                        "fernet_undecryptable",
                    ]),
                    n.wrong_context,
                );
                let mut notes = Vec::new();
                if n.count(&["fernet"]) > 0 {
                    notes.push(format!(
                        "{} Fernet values move onto the new key ({})",
                        n.count(&["fernet"]),
                        crate::ops::fernet_by_key(&n)
                    ));
                }
                if n.count(&["fernet_undecryptable"]) > 0 {
                    notes.push(format!(
                        "{} Fernet values no imported key decrypts: the job lists them in ekm.rotation_problem and keeps the imported keys rotating",
                        n.count(&["fernet_undecryptable"])
                    ));
                }
                if x > 0 {
                    notes.push(format!(
                        "{x} values do not decrypt with the registered context '{context}' (bound to another context, or altered): the rotation would stop at them; fix them before rotating"
                    ));
                }
                if p > 0 {
                    notes.push(format!(
                        "{p} values are not ekm ciphertexts and will be left as they are"
                    ));
                }
                if u > 0 {
                    notes.push(format!("{u} values are on keys that cannot decrypt (unknown, retired or destroyed): they cannot be moved"));
                }
                out.push((
                    None,
                    tname.clone(),
                    col.clone(),
                    Some(m),
                    Some(p),
                    Some(u),
                    Some(m as f64 / ESTIMATE_ROWS_PER_SECOND),
                    (!notes.is_empty()).then(|| notes.join("; ")),
                ));
            }
            return Ok((None, out));
        }
        supersede_unfinished(force, "a new rotation")?;
        let (active, age, _) = active_key_age()?;
        if !force && !age.needs_rotation {
            raise_with(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!(
                    "active key {active} is {} days old and not due for rotation until {}",
                    age.age_days,
                    age.due_at.format("%Y-%m-%d %H:%M UTC")
                ),
                Some("rotate anyway with SELECT ekm_rotate(force => true)".into()),
            );
        }
        let (job, new_key) = switch_to_new_key(
            &active,
            batch_size,
            &catalog::acting_role_name(),
            &[("forced", &force.to_string())],
        )?;
        let out = cols
            .iter()
            .map(|(_, t, c, _)| {
                (
                    Some(job),
                    t.clone(),
                    c.clone(),
                    None,
                    None,
                    None,
                    None,
                    Some(format!("new writes use {new_key}")),
                )
            })
            .collect();
        Ok((Some(job), out))
    })?;
    if let Some(j) = job {
        worker::launch_or_warn(j);
    }
    Ok(rows)
}

/// Waits for a rotation job to end, with NOTICE progress lines.
#[pg_extern(volatile)]
fn ekm_rotation_wait(
    job: i64,
    timeout_seconds: default!(Option<f64>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(job_id, i64),
        name!(state, String),
        name!(rows_done, i64),
        name!(error, Option<String>),
    ),
> {
    let r = catalog::with_safe_search_path(|| rotation_wait(job, timeout_seconds));
    TableIterator::once(r)
}

fn rotation_wait(job: i64, timeout_seconds: Option<f64>) -> (i64, String, i64, Option<String>) {
    if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
        raise_with(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "ekm_rotation_wait needs READ COMMITTED isolation".into(),
            Some("its snapshot would never see the job progress; call it outside a REPEATABLE READ transaction".into()),
        );
    }
    let mine = catalog::one::<bool>(
        "SELECT xmin = xid(pg_current_xact_id_if_assigned()) FROM ekm.rotation_job WHERE job_id = $1",
        vec![job.into()],
    )
    .or_raise();
    if mine == Some(true) {
        raise_with(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("rotation job {job} was started in this transaction"),
            Some("its worker starts when this transaction commits: commit, then call ekm_rotation_wait".into()),
        );
    }
    // A rotation's final check waits for the transactions that were running
    // when its passes ended (they may hold copies of old-key values), except
    // the sessions waiting here: they have written nothing, and their
    // transaction may not commit a write afterwards (`shmem::register_waiter`).
    let wrote = catalog::one::<bool>(
        "SELECT pg_current_xact_id_if_assigned() IS NOT NULL",
        vec![],
    )
    .or_raise()
    .unwrap_or(false);
    struct WaiterSlot;
    impl Drop for WaiterSlot {
        fn drop(&mut self) {
            crate::shmem::unregister_waiter();
        }
    }
    let mut slot: Option<WaiterSlot> = None;
    let start = std::time::Instant::now();
    let mut last_notice = std::time::Instant::now() - std::time::Duration::from_secs(10);
    let mut last_rows = -1i64;
    let mut last_pct = 0i64;
    loop {
        // Each poll reads with a fresh snapshot (READ COMMITTED), pushed
        // here: pgrx's `update()` would take one too, but it first assigns
        // the transaction an xid (`Spi::mark_mutable`), and a rotation waits
        // for transactions with an xid before it retires the old key.
        unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
        let r = Spi::connect(|c| -> pgrx::spi::SpiResult<Option<(String, i64, Option<String>, String, i64)>> {
            let t = c.select(
                "SELECT j.state, j.rows_done, j.error, j.kind, coalesce((SELECT floor(sum(s.w * s.p) / greatest(sum(s.w), 1)) FROM \
                   (SELECT greatest(c.blocks_total, 1) AS w, CASE WHEN c.state = 'done' THEN 100 WHEN c.passes > 1 THEN 99.9 \
                           ELSE least(99.9, 100.0 * c.next_block / greatest(c.blocks_total, 1)) END AS p \
                    FROM ekm.rotation_cursor c WHERE c.job_id = j.job_id) s), 0)::bigint \
                 FROM ekm.rotation_job j WHERE j.job_id = $1",
                None,
                &[job.into()],
            )?;
            if t.is_empty() {
                return Ok(None);
            }
            let r = t.first();
            Ok(Some((r.get::<String>(1)?.unwrap_or_default(), r.get::<i64>(2)?.unwrap_or(0), r.get::<String>(3)?, r.get::<String>(4)?.unwrap_or_default(), r.get::<i64>(5)?.unwrap_or(0))))
        })
        .map_err(internal)
        .or_raise();
        unsafe { pg_sys::PopActiveSnapshot() };
        let Some((state, rows, error, kind, pct)) = r else {
            raise_with(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                format!("rotation job {job} does not exist"),
                Some("list the jobs with SELECT job_id, kind, state FROM ekm.rotation_job ORDER BY job_id DESC".into()),
            );
        };
        let verb = match kind.as_str() {
            "encrypt" => "encrypted",
            "scan" => "found",
            _ => "re-encrypted",
        };
        let what = match kind.as_str() {
            "encrypt" => "column encryption",
            "rollback" => "rollback",
            "scan" => "database scan",
            _ => "rotation",
        };
        if state != "running" {
            pgrx::notice!("ekm: {what} job {job} {state}: {rows} values {verb}");
            return (job, state, rows, error);
        }
        if wrote {
            raise_with(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("ekm_rotation_wait cannot wait for job {job} in a transaction that has written data"),
                Some("a rotation retires the old key only after such transactions end, so this wait would not end: commit, then call ekm_rotation_wait".into()),
            );
        }
        if slot.is_none() {
            // From here on the job does not wait for this session, so this
            // transaction must not commit a write (it could write back values
            // it read before, on the key being retired): checked at commit.
            if !crate::shmem::register_waiter() {
                raise_with(
                    PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
                    format!(
                        "more than {} sessions are waiting for rotation jobs",
                        crate::shmem::WAITER_SLOTS
                    ),
                    Some("follow the job with SELECT * FROM ekm.rotation_progress instead".into()),
                );
            }
            slot = Some(WaiterSlot);
        }
        // of the whole job, never backwards (a column sent back for another
        // pass, a partition attached meanwhile)
        let pct = pct.max(last_pct);
        last_pct = pct;
        if rows != last_rows && last_notice.elapsed() >= std::time::Duration::from_secs(1) {
            pgrx::notice!("ekm: {what} job {job}: {rows} values {verb}, {pct}% of the job done");
            last_notice = std::time::Instant::now();
            last_rows = rows;
        }
        if let Some(t) = timeout_seconds {
            if start.elapsed().as_secs_f64() >= t {
                return (job, state, rows, error);
            }
        }
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                25,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        pgrx::check_for_interrupts!();
    }
}

/// Stops a running job after its current batch; every value stays decryptable.
#[pg_extern(volatile)]
fn ekm_rotation_cancel(job: i64) -> String {
    set_job_state(job, "running", "cancelled", "rotation_cancelled").or_raise()
}

/// Continues a cancelled, failed or stalled job where its cursors stand.
#[pg_extern(volatile)]
fn ekm_rotation_resume(job: i64) -> String {
    let r = set_job_state(job, "resumable", "running", "rotation_resumed").or_raise();
    if let Err(e) = worker::launch(job) {
        raise_with(
            PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            format!("could not start the rotation worker: {e}"),
            Some(
                "raise max_worker_processes, or retry when a background worker slot is free".into(),
            ),
        );
    }
    r
}

fn set_job_state(job: i64, from: &str, to: &str, event: &str) -> EkmResult<String> {
    let (_, owner) = catalog::ekm_tables()?;
    as_owner(owner, || {
        // waits for the job's final step: a cancel either comes first (and
        // the job retires nothing) or finds the job done
        lock_key_changes()?;
        let cur = catalog::one_mut::<String>(
            "SELECT state FROM ekm.rotation_job WHERE job_id = $1 FOR UPDATE",
            vec![job.into()],
        )?;
        let Some(cur) = cur else {
            raise_with(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                format!("rotation job {job} does not exist"),
                Some("list the jobs with SELECT job_id, kind, state FROM ekm.rotation_job ORDER BY job_id DESC".into()),
            );
        };
        let ok = match from {
            "resumable" => cur != "done",
            f => cur == f,
        };
        if !ok {
            let hint = match (from, cur.as_str()) {
                ("running", "done") => "only a running job can be cancelled; this one has finished".to_string(),
                ("running", _) => format!(
                    "only a running job can be cancelled; this one continues with SELECT ekm_rotation_resume({job})"
                ),
                ("resumable", _) => {
                    "a finished job cannot be resumed; start a new one (e.g. SELECT * FROM ekm_rotate())".to_string()
                }
                _ => format!("see SELECT * FROM ekm.rotation_progress WHERE job_id = {job}"),
            };
            raise_with(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("rotation job {job} is {cur}"),
                Some(hint),
            );
        }
        catalog::exec(
            "UPDATE ekm.rotation_job SET state = $2, error = NULL, finished_at = CASE WHEN $2 = 'running' THEN NULL ELSE now() END WHERE job_id = $1",
            vec![job.into(), to.into()],
        )?;
        if to == "running" {
            // found again by the job's check if they are still there
            catalog::exec(
                "DELETE FROM ekm.rotation_problem_row WHERE job_id = $1",
                vec![job.into()],
            )?;
        }
        catalog::audit(
            event,
            None,
            &catalog::json_object(&[("job_id", &job.to_string()), ("from", &cur)]),
        )?;
        Ok(format!("rotation job {job}: {cur} -> {to}"))
    })
}

/// Automatic rotation (the launcher's check in one database): starts a
/// rotation when the active key is due, exactly as `ekm_rotate()` would, and
/// returns its job. `None`, with the reason, when nothing is to be done.
pub(crate) fn auto_rotate() -> EkmResult<Result<i64, String>> {
    let (_, owner) = catalog::ekm_tables()?;
    as_owner(owner, || {
        lock_key_changes()?;
        if let Some((j, state)) = first_job(
            "WHERE state IN ('running', 'cancelled', 'needs_attention') AND kind <> 'scan'",
        )? {
            return Ok(Err(format!("job {j} is {state}")));
        }
        if last_rollback_job()?.is_some() {
            return Ok(Err(
                "the last key change was a rollback; automatic rotation waits for the next manual ekm_rotate()".into(),
            ));
        }
        let registered =
            catalog::one::<i64>("SELECT count(*) FROM ekm.registered_column", vec![])?.unwrap_or(0);
        let (active, age, _) = active_key_age()?;
        if !age.needs_rotation {
            return Ok(Err(format!("active key {active} is not due")));
        }
        if registered == 0 {
            return Ok(Err(format!(
                "active key {active} is due, but no column is registered for rotation"
            )));
        }
        let (job, _) = switch_to_new_key(
            &active,
            1000,
            "ekm auto-rotation",
            &[
                ("automatic", "true"),
                ("age_days", &age.age_days.to_string()),
            ],
        )?;
        Ok(Ok(job))
    })
}

fn first_job(filter: &str) -> EkmResult<Option<(i64, String)>> {
    let (j, s) = catalog::two::<i64, String>(
        &format!("SELECT job_id, state FROM ekm.rotation_job {filter}"),
        vec![],
    )?;
    Ok(j.zip(s))
}

/// The job of the last key change (rotation or rollback), if that was a
/// rollback: automatic rotation waits for a manual ekm_rotate() after it.
pub(crate) fn last_rollback_job() -> EkmResult<Option<i64>> {
    let (job, kind) = catalog::two::<i64, String>(
        "SELECT job_id, kind FROM ekm.rotation_job WHERE kind IN ('rotate', 'rollback') ORDER BY job_id DESC LIMIT 1",
        vec![],
    )?;
    Ok(job.filter(|_| kind.as_deref() == Some("rollback")))
}
