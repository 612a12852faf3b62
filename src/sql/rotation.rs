//! Rotation's SQL surface: registered columns, ekm_rotate (switch + job),
//! wait / cancel / resume. The batches run in `worker.rs`.
use crate::jobs::start::{
    active_key_age, check_batch_size, supersede_unfinished, switch_to_new_key, sync_partitions,
    ESTIMATE_ROWS_PER_SECOND,
};
use crate::jobs::worker;
use crate::keys::catalog;
use crate::keys::lifecycle::lock_key_changes;
use crate::pg::error::{internal, refuse_on_standby};
use crate::pg::error::{raise_with, OrRaise};
use crate::pg::owner::{self, as_owner};
use crate::pg::spi;
use ekm_core::format;
use pgrx::prelude::*;

type EkmResult<T> = ekm_core::Result<T>;

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
        let rows = owner::with_safe_search_path(|| column_key_counts(tbl, col)).or_raise();
        TableIterator::new(rows)
    }
}

type KeyCountRow = (Option<String>, String, Option<i64>);

fn column_key_counts(tbl: pg_sys::Oid, col: &str) -> EkmResult<Vec<KeyCountRow>> {
    owner::Table::require(tbl)?;
    let t = match crate::jobs::scan::readable(tbl, col, true)? {
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
    let n = crate::jobs::scan::census(&t, &[(col.to_string(), String::new())], false)?
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
    let name = owner::display_name(tbl);
    owner::with_safe_search_path(|| register_as_caller(tbl, col, context, &name))
}

pub(crate) fn register_as_caller(
    tbl: pg_sys::Oid,
    col: &str,
    context: &str,
    name: &str,
) -> EkmResult<String> {
    // Only ordinary and partitioned tables (42809 for a view, ...).
    owner::Table::require(tbl)?;
    // Citus tables: registered on the coordinator, which sends the registration
    // to every node; each registers the placements it holds (design.md, 9).
    let citus_table = crate::pg::citus::is_citus_table(tbl)?;
    if citus_table {
        crate::keys::cluster::refuse_citus_registration_here(name)?;
    }
    // As the caller: the column must exist, hold text, and be theirs to update.
    match crate::jobs::scan::column_type(tbl, col)? {
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
    let may_update = spi::one::<bool>(
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
        let existing = spi::one::<String>(
            "SELECT context FROM ekm.registered_column WHERE tbl = $1::regclass AND col = $2",
            vec![tbl.into(), col.into()],
        )?;
        let parent = spi::one::<String>(
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
        if let Some(other) = spi::one::<String>(
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
        spi::exec(
            "INSERT INTO ekm.registered_column (tbl, col, context, registered_by) VALUES ($1::regclass, $2, $3, $4)",
            vec![tbl.into(), col.into(), context.into(), owner::acting_role_name().into()],
        )?;
        sync_partitions()?;
        if citus_table {
            crate::keys::cluster::propagate_registrations()?;
        }
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
    let name = owner::display_name(tbl);
    let (_, owner) = catalog::ekm_tables()?;
    as_owner(owner, || {
        lock_key_changes()?;
        if let Some(j) = spi::one::<i64>(
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
        if let Some(parent) = spi::one::<String>(
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
        let n = spi::one_mut::<i64>(
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
        if crate::pg::citus::is_citus_table(tbl)? {
            crate::keys::cluster::refuse_citus_registration_here(&name)?;
            crate::keys::cluster::propagate_registrations()?;
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
                let t = match crate::jobs::scan::readable(*oid, col, true)? {
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
                let n = crate::jobs::scan::census(&t, &[(col.clone(), context.clone())], true)?
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
                        crate::jobs::scan::fernet_by_key(&n)
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
            &owner::acting_role_name(),
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
    let r = owner::with_safe_search_path(|| rotation_wait(job, timeout_seconds));
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
    let mine = spi::one::<bool>(
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
    let wrote = spi::one::<bool>(
        "SELECT pg_current_xact_id_if_assigned() IS NOT NULL",
        vec![],
    )
    .or_raise()
    .unwrap_or(false);
    struct WaiterSlot;
    impl Drop for WaiterSlot {
        fn drop(&mut self) {
            crate::keys::shmem::unregister_waiter();
        }
    }
    let mut slot: Option<WaiterSlot> = None;
    // a plain SELECT ekm_rotation_wait(...) does not keep the vacuum behind
    // the batches from freeing what they rewrote (pg/xmin.rs)
    let release_xmin = crate::pg::xmin::waiting_statement_may_release_xmin();
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
            // (on a Citus coordinator: and each worker node's part, by its blocks)
            let t = c.select(
                "SELECT j.state, j.rows_done + coalesce((SELECT sum(n.rows_done) FROM ekm.rotation_node n WHERE n.job_id = j.job_id), 0)::bigint, \
                        j.error, j.kind, coalesce((SELECT floor(sum(s.w * s.p) / greatest(sum(s.w), 1)) FROM \
                   (SELECT greatest(c.blocks_total, 1) AS w, CASE WHEN c.state = 'done' THEN 100 WHEN c.passes > 1 THEN 99.9 \
                           ELSE least(99.9, 100.0 * c.next_block / greatest(c.blocks_total, 1)) END AS p \
                    FROM ekm.rotation_cursor c WHERE c.job_id = j.job_id \
                    UNION ALL \
                    SELECT greatest(n.blocks_total, 1), CASE WHEN n.state IN ('verified', 'done') THEN 100 ELSE least(99.9, n.percent) END \
                    FROM ekm.rotation_node n WHERE n.job_id = j.job_id) s), 0)::bigint \
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
            if !crate::keys::shmem::register_waiter() {
                raise_with(
                    PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
                    format!(
                        "more than {} sessions are waiting for rotation jobs",
                        crate::keys::shmem::WAITER_SLOTS
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
        if release_xmin {
            crate::pg::xmin::release_xmin();
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
        let cur = spi::one_mut::<String>(
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
        spi::exec(
            "UPDATE ekm.rotation_job SET state = $2, error = NULL, finished_at = CASE WHEN $2 = 'running' THEN NULL ELSE now() END WHERE job_id = $1",
            vec![job.into(), to.into()],
        )?;
        if to == "running" {
            // found again by the job's check if they are still there
            spi::exec(
                "DELETE FROM ekm.rotation_problem_row WHERE job_id = $1",
                vec![job.into()],
            )?;
        }
        catalog::audit(
            event,
            None,
            &catalog::json_object(&[("job_id", &job.to_string()), ("from", &cur)]),
        )?;
        if to == "cancelled" {
            // on a Citus coordinator: the worker nodes' parts too, in this transaction
            crate::jobs::cluster::cancel_nodes(job)?;
        }
        Ok(format!("rotation job {job}: {cur} -> {to}"))
    })
}
