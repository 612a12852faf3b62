//! Background workers: the per-database rotation worker (one batch per
//! transaction, docs/design.md section 5) and the launcher that resumes
//! unfinished jobs after a server restart.

use crate::catalog;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::prelude::*;
use pgrx::PgOid;
use std::time::Duration;

/// Advisory lock class that a worker holds for its job (one worker per job).
pub(crate) const JOB_LOCK_CLASS: i32 = 0x656b6d; // "ekm"

/// Starts a rotation worker for `job_id` (0: whatever job is running) in this database.
pub fn launch(job_id: i64) -> Result<(), String> {
    launch_in(unsafe { pg_sys::MyDatabaseId }, job_id)
}

fn launch_in(db: pg_sys::Oid, job_id: i64) -> Result<(), String> {
    BackgroundWorkerBuilder::new(&format!(
        "ekm rotation job {job_id} (database {})",
        db.to_u32()
    ))
    .set_type("ekm rotation")
    .set_library("ekm")
    .set_function("ekm_rotation_worker_main")
    .set_argument(Some(pg_sys::Datum::from(job_id)))
    .set_extra(&db.to_u32().to_string())
    .enable_spi_access()
    .load_dynamic()
    .map(|_| ())
    .map_err(|e| format!("{e:?}"))
}

/// Starts the worker of a job just recorded; if no worker slot is free now,
/// says how to start it later (the job stays running and resumable).
pub fn launch_or_warn(job: i64) {
    if let Err(e) = launch(job) {
        pgrx::warning!(
            "ekm: could not start the rotation worker now ({e}); the job stays running: SELECT ekm_rotation_resume({job}) starts it"
        );
    }
}

/// Registers the launcher (from _PG_init, while preloading).
pub fn register_launcher() {
    BackgroundWorkerBuilder::new("ekm launcher")
        .set_type("ekm launcher")
        .set_library("ekm")
        .set_function("ekm_launcher_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

/// The launcher: at start (and after every crash-restart cycle) it starts a
/// worker in each database that resumes whatever rotation is running there,
/// then idles.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn ekm_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(Some("postgres"), None);
    let dbs: Vec<pg_sys::Oid> = BackgroundWorker::transaction(|| {
        Spi::connect(|c| {
            let mut v = Vec::new();
            if let Ok(t) = c.select(
                "SELECT oid FROM pg_catalog.pg_database WHERE datallowconn AND NOT datistemplate",
                None,
                &[],
            ) {
                for r in t {
                    if let Ok(Some(o)) = r.get::<pg_sys::Oid>(1) {
                        v.push(o);
                    }
                }
            }
            v
        })
    });
    for db in dbs {
        if let Err(e) = launch_in(db, 0) {
            pgrx::warning!(
                "ekm launcher: cannot start a worker for database {}: {e}",
                db.to_u32()
            );
        }
    }
    // Automatic rotation: every ekm.auto_rotate_naptime, a short-lived worker
    // per listed database checks whether the active key is due.
    let mut next_check = std::time::Instant::now() + crate::gucs::auto_rotate_naptime();
    let mut warned_for = String::new();
    loop {
        let wait = next_check
            .saturating_duration_since(std::time::Instant::now())
            .min(Duration::from_secs(1));
        if !BackgroundWorker::wait_latch(Some(wait)) {
            break;
        }
        if reload_config_if_asked() {
            // a shorter naptime applies at once
            next_check =
                next_check.min(std::time::Instant::now() + crate::gucs::auto_rotate_naptime());
        }
        if std::time::Instant::now() < next_check {
            continue;
        }
        next_check = std::time::Instant::now() + crate::gucs::auto_rotate_naptime();
        // Databases to visit: those with encryption counts to write down,
        // and, with automatic rotation on, the listed ones.
        let pending: Vec<u32> = crate::shmem::databases_with_pending();
        let auto = crate::gucs::auto_rotate();
        if pending.is_empty() && !auto {
            continue;
        }
        let names = if auto {
            crate::gucs::auto_rotate_databases()
        } else {
            Vec::new()
        };
        let found: Vec<(pg_sys::Oid, String)> = BackgroundWorker::transaction(|| {
            Spi::connect(|c| {
                let mut v = Vec::new();
                if let Ok(t) = c.select(
                    "SELECT oid, datname::text FROM pg_catalog.pg_database \
                     WHERE (datname = ANY($1) OR oid::int8 = ANY($2)) AND datallowconn AND NOT datistemplate",
                    None,
                    &[names.clone().into(), pending.iter().map(|&o| o as i64).collect::<Vec<i64>>().into()],
                ) {
                    for r in t {
                        if let (Ok(Some(o)), Ok(Some(n))) = (r.get::<pg_sys::Oid>(1), r.get::<String>(2)) {
                            v.push((o, n));
                        }
                    }
                }
                v
            })
        });
        let missing: Vec<&String> = names
            .iter()
            .filter(|n| !found.iter().any(|(_, f)| f == *n))
            .collect();
        let key = format!("{names:?}");
        if auto && names.is_empty() && warned_for != key {
            pgrx::warning!("ekm launcher: ekm.auto_rotate is on but ekm.auto_rotate_databases lists no database");
            warned_for = key;
        } else if !missing.is_empty() && warned_for != key {
            pgrx::warning!(
                "ekm launcher: ekm.auto_rotate_databases names databases that do not exist or do not allow connections: {}",
                missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            );
            warned_for = key;
        }
        for (db, name) in found {
            if let Err(e) = launch_in(db, MAINTENANCE_JOB) {
                pgrx::warning!(
                    "ekm launcher: cannot start the maintenance worker in database {name}: {e}"
                );
            }
        }
    }
}

/// The job argument that asks a worker to write down encryption counts and,
/// with automatic rotation on for this database, rotate a due key.
const MAINTENANCE_JOB: i64 = -1;

/// Applies a configuration reload (SIGHUP), if one was asked for.
fn reload_config_if_asked() -> bool {
    let asked = BackgroundWorker::sighup_received();
    if asked {
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
    }
    asked
}

enum Step {
    /// Made progress; go on at once (after the throttle pause).
    Again,
    /// Nothing to do right now (rows locked, old transactions); retry later.
    Later,
    /// Job finished, cancelled, failed or gone.
    Stop,
}

fn spi_err(e: pgrx::spi::Error) -> String {
    e.to_string()
}

/// One transaction: `f` commits, or on ERROR the transaction is aborted and
/// the SQLSTATE and message returned.
fn transaction<R>(f: impl FnOnce() -> Result<R, String>) -> Result<R, (String, String)> {
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let f = std::panic::AssertUnwindSafe(f);
    let r = PgTryBuilder::new(move || f().map_err(|m| ("XX000".to_string(), m)))
        .catch_others(|e| match e {
            pg_sys::panic::CaughtError::PostgresError(r)
            | pg_sys::panic::CaughtError::ErrorReport(r) => {
                Err((format!("{:?}", r.sql_error_code()), r.message().to_string()))
            }
            pg_sys::panic::CaughtError::RustPanic { ereport, .. } => {
                Err(("XX000".into(), ereport.message().to_string()))
            }
        })
        .execute();
    unsafe {
        match &r {
            Ok(_) => {
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
            }
            Err(_) => pg_sys::AbortCurrentTransaction(),
        }
    }
    r
}

/// The rotation worker. `arg` is the job id (0: the running job, if any).
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn ekm_rotation_worker_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let db: u32 = BackgroundWorker::get_extra().parse().unwrap_or(0);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(db)), None);
    // The worker is a superuser: nothing planted in a schema of the
    // database's or the role's search_path may be picked up by its SQL.
    if transaction(|| Spi::run("SET search_path = pg_catalog, pg_temp").map_err(spi_err)).is_err() {
        return;
    }
    let mut job_id = arg.value() as i64;
    if job_id == MAINTENANCE_JOB {
        let r = transaction(|| {
            let installed =
                Spi::get_one::<bool>("SELECT to_regclass('ekm.rotation_job') IS NOT NULL")
                    .map_err(spi_err)?
                    .unwrap_or(false);
            if !installed {
                return Ok(Err("ekm is not installed in this database".to_string()));
            }
            crate::api::flush_encryption_counts().map_err(|e| e.to_string())?;
            let db = Spi::get_one::<String>("SELECT current_database()::text")
                .map_err(spi_err)?
                .unwrap_or_default();
            if !crate::gucs::auto_rotate() || !crate::gucs::auto_rotate_databases().contains(&db) {
                return Ok(Err(
                    "automatic rotation is off for this database".to_string()
                ));
            }
            crate::rotation::auto_rotate().map_err(|e| e.to_string())
        });
        match r {
            Ok(Ok(j)) => {
                pgrx::log!(
                    "ekm: automatic rotation: the active key is due; started rotation job {j}"
                );
                job_id = j;
            }
            Ok(Err(why)) => {
                pgrx::debug1!("ekm: automatic rotation: nothing to do ({why})");
                return;
            }
            Err((_, msg)) => {
                pgrx::warning!(
                    "ekm: maintenance (encryption counts, automatic rotation) failed: {msg}"
                );
                return;
            }
        }
    }

    // Find the job (it becomes visible when the caller's transaction commits)
    // and take its lock, so that one worker at most runs it.
    let mut found = false;
    for _ in 0..5000 {
        let r = transaction(|| {
            let installed =
                Spi::get_one::<bool>("SELECT to_regclass('ekm.rotation_job') IS NOT NULL")
                    .map_err(spi_err)?
                    .unwrap_or(false);
            if !installed {
                return Ok(Some(false));
            }
            let id = if job_id == 0 {
                catalog::one::<i64>(
                    "SELECT job_id FROM ekm.rotation_job WHERE state = 'running'",
                    vec![],
                )
            } else {
                catalog::one::<i64>(
                    "SELECT job_id FROM ekm.rotation_job WHERE job_id = $1 AND state = 'running'",
                    vec![job_id.into()],
                )
            }
            .map_err(|e| e.to_string())?;
            Ok(id.map(|id| {
                job_id = id;
                true
            }))
        });
        match r {
            Ok(Some(true)) => {
                found = true;
                break;
            }
            Ok(Some(false)) => return, // ekm not installed in this database
            Ok(None) if arg.value() == 0 => return, // nothing to resume here
            _ => {}
        }
        if !BackgroundWorker::wait_latch(Some(Duration::from_millis(2))) {
            return;
        }
    }
    if !found {
        return;
    }
    let locked = transaction(|| {
        Spi::get_one_with_args::<bool>(
            "SELECT pg_try_advisory_lock($1, $2::int)",
            &[JOB_LOCK_CLASS.into(), (job_id as i32).into()],
        )
        .map_err(spi_err)
        .map(|b| b.unwrap_or(false))
    })
    .unwrap_or(false);
    if !locked {
        return; // another worker runs this job
    }
    if let Err((_, msg)) = transaction(create_batch_functions) {
        pgrx::warning!("ekm: rotation job {job_id}: cannot create the batch functions: {msg}");
        return;
    }
    pgrx::log!("ekm: rotation job {job_id}: worker started");
    // Batches commit without waiting for their WAL to reach disk: a crash
    // can lose the last few, and with them their cursor update (same WAL
    // stream), so the resumed job redoes them. The transaction that retires
    // the old key and marks the job done commits synchronously (finish).
    let _ = transaction(|| Spi::run("SET synchronous_commit = off").map_err(spi_err));

    loop {
        let _ = reload_config_if_asked();
        let r = transaction(|| step(job_id));
        let pause = match r {
            Ok(Step::Again) => crate::gucs::rotation_batch_pause(),
            Ok(Step::Later) => crate::gucs::rotation_retry_pause(),
            Ok(Step::Stop) => break,
            Err((_, msg)) if msg == STALE_GROUP => std::time::Duration::ZERO,
            Err((code, _)) if code.contains("LOCK_NOT_AVAILABLE") => {
                // an application holds a row of this batch: redo it at once,
                // skipping locked rows (a later pass takes them)
                SKIP_LOCKED_NEXT.with(|s| s.set(true));
                std::time::Duration::ZERO
            }
            Err((code, msg)) if code.contains("DEADLOCK") || code.contains("SERIALIZATION") => {
                pgrx::log!("ekm: rotation job {job_id}: batch skipped ({msg}); retrying");
                SKIP_LOCKED_NEXT.with(|s| s.set(true));
                crate::gucs::rotation_retry_pause()
            }
            Err((_, msg)) => {
                pgrx::warning!("ekm: rotation job {job_id} failed: {msg}");
                let _ = transaction(|| {
                    catalog::exec(
                        "UPDATE ekm.rotation_job SET state = 'failed', error = $2, finished_at = now() WHERE job_id = $1 AND state = 'running'",
                        vec![job_id.into(), msg.clone().into()],
                    )
                    .map_err(|e| e.to_string())?;
                    catalog::audit(
                        "rotation_failed",
                        None,
                        &catalog::json_object(&[("job_id", &job_id.to_string()), ("error", &msg)]),
                    )
                    .map_err(|e| e.to_string())?;
                    let kind = catalog::one::<String>(
                        "SELECT kind FROM ekm.rotation_job WHERE job_id = $1",
                        vec![job_id.into()],
                    )
                    .map_err(|e| e.to_string())?
                    .unwrap_or_default();
                    notify(job_id, &kind, "failed")
                });
                break;
            }
        };
        if !BackgroundWorker::wait_latch(Some(pause)) {
            pgrx::log!("ekm: rotation job {job_id}: worker stopping; the job resumes with ekm_rotation_resume({job_id}) or at server start");
            break;
        }
    }
    wake_waiters();
}

/// Wakes the sessions of this database sleeping on an extension wait event
/// (`ekm_rotation_wait` among them), so that a waiter sees the job's end at
/// once rather than at its next poll. A spurious wakeup is harmless to any
/// latch wait.
fn wake_waiters() {
    let pids = transaction(|| {
        Spi::connect(|c| -> pgrx::spi::SpiResult<Vec<i32>> {
            let mut v = Vec::new();
            for r in c.select(
                "SELECT pid FROM pg_stat_activity \
                 WHERE datid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                   AND wait_event_type = 'Extension' AND pid <> pg_backend_pid()",
                None,
                &[],
            )? {
                if let Some(p) = r.get::<i32>(1)? {
                    v.push(p);
                }
            }
            Ok(v)
        })
        .map_err(spi_err)
    })
    .unwrap_or_default();
    for pid in pids {
        unsafe {
            let p = pg_sys::BackendPidGetProc(pid);
            if !p.is_null() {
                pg_sys::SetLatch(&raw mut (*p).procLatch);
            }
        }
    }
}

fn notify(job_id: i64, kind: &str, outcome: &str) -> Result<(), String> {
    Spi::run_with_args(
        "SELECT pg_notify('ekm_rotation', $1)",
        &[catalog::json_object(&[
            ("job_id", &job_id.to_string()),
            ("outcome", outcome),
            ("kind", kind),
        ])
        .into()],
    )
    .map_err(spi_err)
}

/// The per-value functions the batches call, created in this worker's own
/// temporary schema. Batches run as the owner of each table
/// (`catalog::as_table_owner`), who needs EXECUTE on what the batch calls:
/// a function in this backend's temporary schema can be called by every
/// role of this backend and by no other backend, so nothing of ekm is
/// granted to PUBLIC or to table owners. The functions also refuse to act
/// outside a batch of this worker (`fastpath::BatchGate`), so a trigger
/// that runs during a batch cannot use them for anything but the batch's
/// own columns. They disappear with the worker.
fn create_batch_functions() -> Result<(), String> {
    Spi::run(
        "CREATE FUNCTION pg_temp._ekm_rotate_value(pg_catalog.text, pg_catalog.text, pg_catalog.int4) RETURNS pg_catalog.text \
           AS '$libdir/ekm', 'ekm_rotate_value_v1' LANGUAGE c VOLATILE STRICT; \
         CREATE FUNCTION pg_temp._ekm_on_rotating_key(pg_catalog.text) RETURNS pg_catalog.bool \
           AS '$libdir/ekm', 'ekm_on_rotating_key_v1' LANGUAGE c STABLE STRICT; \
         CREATE FUNCTION pg_temp._ekm_encrypt_plain(pg_catalog.text, pg_catalog.text, pg_catalog.int4) RETURNS pg_catalog.text \
           AS '$libdir/ekm', 'ekm_encrypt_plain_v1' LANGUAGE c VOLATILE STRICT; \
         CREATE FUNCTION pg_temp._ekm_is_plaintext(pg_catalog.text) RETURNS pg_catalog.bool \
           AS '$libdir/ekm', 'ekm_is_plaintext_v1' LANGUAGE c IMMUTABLE STRICT; \
         GRANT EXECUTE ON FUNCTION pg_temp._ekm_rotate_value(pg_catalog.text, pg_catalog.text, pg_catalog.int4), \
           pg_temp._ekm_on_rotating_key(pg_catalog.text), \
           pg_temp._ekm_encrypt_plain(pg_catalog.text, pg_catalog.text, pg_catalog.int4), \
           pg_temp._ekm_is_plaintext(pg_catalog.text) TO PUBLIC",
    )
    .map_err(spi_err)
}

fn one_i64(sql: &str, args: Vec<pgrx::datum::DatumWithOid<'_>>) -> Result<i64, String> {
    Spi::connect_mut(|c| {
        let t = c.update(sql, Some(1), &args)?;
        if t.is_empty() {
            Ok(0)
        } else {
            Ok(t.first().get::<i64>(1)?.unwrap_or(0))
        }
    })
    .map_err(spi_err)
}

thread_local! {
    /// The batch statement of the table being worked on, prepared once
    /// (SPI_keepplan) and reused by every batch: (statement text, plan).
    static BATCH_PLAN: std::cell::RefCell<Option<(String, pgrx::spi::OwnedPreparedStatement)>> =
        const { std::cell::RefCell::new(None) };
    /// Set after a batch hit an application's row lock: the next batch skips
    /// locked rows (they are retried by the next pass) instead of waiting.
    static SKIP_LOCKED_NEXT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The job's kind and the group the last batch worked on, at its new
    /// position: the next batch starts from it without re-reading the job
    /// (its bookkeeping statement checks that the job still runs and the
    /// cursors still stand there, else the batch is rolled back and redone).
    static GROUP: std::cell::RefCell<Option<(String, Group)>> = const { std::cell::RefCell::new(None) };
}

thread_local! {
    /// The fence of the final check, taken when the worker first finds
    /// every cursor done; dropped when anything sends a column back for
    /// another pass (or adds a cursor).
    static FENCE: std::cell::RefCell<Option<Fence>> = const { std::cell::RefCell::new(None) };
}

/// What the final check waits for: the virtual transaction ids of the
/// transactions that were running when every cursor was done, then the
/// prepared transactions there were once those had ended.
struct Fence {
    vxids: Vec<String>,
    gids: Option<Vec<String>>,
}

/// A batch found the job or its cursors changed under it: rolled back, redone
/// after re-reading them.
const STALE_GROUP: &str = "ekm: the job or its cursors changed; batch redone";

thread_local! {
    /// Statements every batch runs, prepared once per worker (SPI_keepplan).
    static KEPT: std::cell::RefCell<std::collections::HashMap<&'static str, pgrx::spi::OwnedPreparedStatement>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

const INT8: pg_sys::Oid = pg_sys::INT8OID;

/// Runs `sql` (prepared on first use, then reused) with `args` of `types`;
/// `f` reads the result.
fn kept<R>(
    sql: &'static str,
    types: &[pg_sys::Oid],
    mutating: bool,
    args: &[pgrx::datum::DatumWithOid<'_>],
    f: impl FnOnce(pgrx::spi::SpiTupleTable<'_>) -> pgrx::spi::SpiResult<R>,
) -> Result<R, String> {
    KEPT.with(|k| {
        let mut k = k.borrow_mut();
        Spi::connect_mut(|c| -> pgrx::spi::SpiResult<R> {
            if !k.contains_key(sql) {
                let types: Vec<PgOid> = types.iter().map(|&t| PgOid::from(t)).collect();
                let p = if mutating {
                    c.prepare_mut(sql, &types)?
                } else {
                    c.prepare(sql, &types)?
                };
                k.insert(sql, p.keep());
            }
            let stmt = k.get(sql).expect("prepared above");
            let t = if mutating {
                c.update(stmt, None, args)?
            } else {
                c.select(stmt, None, args)?
            };
            f(t)
        })
    })
    .map_err(spi_err)
}

/// `SET LOCAL name = value`, without a statement.
/// The worker runs as the bootstrap superuser, so superuser-only settings
/// (deadlock_timeout) may be set too.
fn set_local(name: &str, value: &str) {
    let name = std::ffi::CString::new(name).expect("no NUL in a setting name");
    let value = std::ffi::CString::new(value).expect("no NUL in a setting value");
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_LOCAL,
            true,
            pg_sys::PGERROR as i32,
            false,
        );
    }
}

/// The first unfinished cursor group of a job: every column of one table at
/// the same position.
#[derive(Clone)]
struct Group {
    tbl: pg_sys::Oid,
    /// the table's current name and owner, looked up at every batch
    table: Option<catalog::Table>,
    state: String,
    next_block: i64,
    blocks_per_batch: i32,
    /// where this pass ends: the table's size when the pass began (or now,
    /// if it shrank)
    nblocks: i64,
    /// quoted identifiers, names, contexts (same order)
    quoted: Vec<String>,
    names: Vec<String>,
    contexts: Vec<String>,
}

/// The job's kind (None if it no longer runs) and its first unfinished
/// cursor group, with where the group's pass ends, in one statement.
fn read_group(job_id: i64) -> Result<Option<(String, Option<Group>)>, String> {
    kept(
        "SELECT j.kind, g.tbl, g.state, g.next_block, g.blocks_per_batch, g.nblocks, g.quoted, g.names, g.contexts \
         FROM ekm.rotation_job j \
         LEFT JOIN LATERAL ( \
           SELECT f.tbl::oid AS tbl, f.state, f.next_block, f.blocks_per_batch, \
                  least(pg_relation_size(f.tbl) / current_setting('block_size')::bigint, f.blocks_total) AS nblocks, \
                  array_agg(pg_catalog.quote_ident(c.col) ORDER BY c.col) AS quoted, array_agg(c.col::text ORDER BY c.col) AS names, \
                  array_agg(c.context ORDER BY c.col) AS contexts \
           FROM (SELECT tbl, state, next_block, blocks_per_batch, blocks_total FROM ekm.rotation_cursor \
                 WHERE job_id = j.job_id AND state <> 'done' ORDER BY tbl::oid, col LIMIT 1) f \
           JOIN ekm.rotation_cursor c ON c.job_id = j.job_id AND c.tbl = f.tbl AND c.state = f.state AND c.next_block = f.next_block \
           GROUP BY f.tbl, f.state, f.next_block, f.blocks_per_batch, f.blocks_total) g ON true \
         WHERE j.job_id = $1 AND j.state = 'running'",
        &[INT8],
        false,
        &[job_id.into()],
        |t| -> pgrx::spi::SpiResult<Option<(String, Option<Group>)>> {
            if t.is_empty() {
                return Ok(None);
            }
            let r = t.first();
            let kind = r.get::<String>(1)?.unwrap_or_default();
            let group = match r.get::<pg_sys::Oid>(2)? {
                None => None,
                Some(tbl) => Some(Group {
                    tbl,
                    table: None, // set by the caller, at every batch
                    state: r.get::<String>(3)?.unwrap_or_default(),
                    next_block: r.get::<i64>(4)?.unwrap_or(0),
                    blocks_per_batch: r.get::<i32>(5)?.unwrap_or(1),
                    nblocks: r.get::<i64>(6)?.unwrap_or(0),
                    quoted: r.get::<Vec<String>>(7)?.unwrap_or_default(),
                    names: r.get::<Vec<String>>(8)?.unwrap_or_default(),
                    contexts: r.get::<Vec<String>>(9)?.unwrap_or_default(),
                }),
            };
            Ok(Some((kind, group)))
        },
    )
}

fn step(job_id: i64) -> Result<Step, String> {
    // Below deadlock_timeout: in a lock cycle with an application
    // transaction, the batch gives up before the application's deadlock
    // check could abort the application's transaction.
    let lock_timeout_ms = crate::gucs::rotation_lock_timeout_ms()
        .min(unsafe { pg_sys::DeadlockTimeout } / 2)
        .max(1);
    set_local("lock_timeout", &format!("{lock_timeout_ms}ms"));
    // A batch may wait for several application locks in turn (each at most
    // lock_timeout) before it closes a lock cycle with an application that
    // has been waiting for it all along. The worker therefore runs its own
    // deadlock check soon after it starts waiting: in a cycle, the batch is
    // the transaction that gets aborted (and redone), never the application.
    set_local(
        "deadlock_timeout",
        &format!("{}ms", (lock_timeout_ms / 5).max(10)),
    );
    let cached = GROUP.with(|c| c.borrow_mut().take());
    let (kind, mut group) = match cached {
        Some((kind, g)) => (kind, Some(g)),
        None => match read_group(job_id)? {
            Some(head) => head,
            None => return Ok(Step::Stop),
        },
    };
    if let Some(g) = group.as_mut() {
        // the table's current name and owner (the group may be cached from
        // an earlier batch, and a table can be renamed or change hands
        // between batches)
        g.table = Some(catalog::Table::require(g.tbl).map_err(|e| e.to_string())?);
    }
    let encrypt = kind == "encrypt";

    if let Some(g) = group {
        FENCE.with(|f| *f.borrow_mut() = None);
        let table = g.table.as_ref().expect("looked up above");
        // What the job moves: values on a rotating key, or plaintext.
        let (pred, func) = if encrypt {
            ("pg_temp._ekm_is_plaintext", "pg_temp._ekm_encrypt_plain")
        } else {
            ("pg_temp._ekm_on_rotating_key", "pg_temp._ekm_rotate_value")
        };
        let any = |prefix: &str| {
            g.quoted
                .iter()
                .map(|q| format!("{pred}({prefix}{q})"))
                .collect::<Vec<_>>()
                .join(" OR ")
        };
        let set_cursors =
            |sql: &str, extra: Vec<pgrx::datum::DatumWithOid<'_>>| -> Result<(), String> {
                let mut args: Vec<pgrx::datum::DatumWithOid<'_>> =
                    vec![job_id.into(), g.tbl.into(), g.names.clone().into()];
                args.extend(extra);
                catalog::exec(sql, args)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            };

        if g.state == "scanning" {
            if g.next_block >= g.nblocks {
                // A pass ends at the table's size when it began
                // (blocks_total): beyond it are the row versions the batches
                // appended, already moved, and rows written since, which the
                // final check (below) scans for with the whole table, sending
                // the column back for another pass if one needs moving. A
                // migration sweeps its column first.
                set_cursors(
                    if encrypt {
                        "UPDATE ekm.rotation_cursor SET state = 'sweeping' \
                         WHERE job_id = $1 AND tbl = $2::regclass AND col = ANY($3::name[])"
                    } else {
                        "UPDATE ekm.rotation_cursor SET state = 'done', rows_total = rows_done \
                         WHERE job_id = $1 AND tbl = $2::regclass AND col = ANY($3::name[])"
                    },
                    vec![],
                )?;
                return Ok(Step::Again);
            }
            let hi = g.next_block + g.blocks_per_batch as i64;
            // Identifiers are quoted by PostgreSQL (quote_identifier), every
            // function and operator is qualified; values are bound. Each
            // function returns the value unchanged unless it moves it.
            let sets = g
                .quoted
                .iter()
                .enumerate()
                .map(|(i, q)| format!("{q} = {func}(t.{q}, ${}::pg_catalog.text, {i})", i + 3))
                .collect::<Vec<_>>()
                .join(", ");
            let skip_locked = SKIP_LOCKED_NEXT.with(|s| s.replace(false));
            let sql = if skip_locked {
                // Rows an application holds are skipped, not waited for.
                format!(
                    "WITH c AS (SELECT ctid FROM {t} WHERE ctid OPERATOR(pg_catalog.>=) $1::pg_catalog.tid \
                                  AND ctid OPERATOR(pg_catalog.<) $2::pg_catalog.tid AND ({a}) FOR UPDATE SKIP LOCKED) \
                     UPDATE {t} t SET {sets} FROM c WHERE t.ctid OPERATOR(pg_catalog.=) c.ctid",
                    t = table.qualified,
                    a = any(""),
                )
            } else {
                // A plain UPDATE: a row an application holds is waited for at
                // most lock_timeout, then the batch is retried skipping locked rows.
                format!(
                    "UPDATE {t} t SET {sets} WHERE t.ctid OPERATOR(pg_catalog.>=) $1::pg_catalog.tid \
                       AND t.ctid OPERATOR(pg_catalog.<) $2::pg_catalog.tid AND ({a})",
                    t = table.qualified,
                    a = any("t."),
                )
            };
            let mut args: Vec<pgrx::datum::DatumWithOid<'_>> = vec![
                format!("({},0)", g.next_block).into(),
                format!("({hi},0)").into(),
            ];
            for ctx in &g.contexts {
                args.push(ctx.clone().into());
            }
            crate::fastpath::reset_moved();
            // As the table's owner, security-restricted: its triggers,
            // constraints and index expressions run as that owner.
            let _gate = crate::fastpath::BatchGate::open(&g.contexts);
            table
                .as_owner(|| {
                    BATCH_PLAN.with(|p| -> pgrx::spi::SpiResult<()> {
                        let mut p = p.borrow_mut();
                        Spi::connect_mut(|c| {
                            if p.as_ref().map(|(s, _)| s != &sql).unwrap_or(true) {
                                let types = vec![PgOid::from(pg_sys::TEXTOID); args.len()];
                                *p = Some((
                                    sql.clone(),
                                    c.prepare_mut(sql.as_str(), &types)?.keep(),
                                ));
                            }
                            c.update(&p.as_ref().expect("prepared").1, None, &args)?;
                            Ok(())
                        })
                    })
                })
                .map_err(spi_err)?;
            drop(_gate);
            let ns = crate::fastpath::moved(g.names.len());
            let total: i64 = ns.iter().sum();
            // Counts and cursors move with the batch, in its transaction, if
            // the job still runs (its row is updated first and stays locked
            // until the batch commits: a cancel waits for it) and its cursors
            // still stand where the batch began; else the batch is rolled
            // back and redone after a fresh read. One statement, on a generic
            // plan (primary-key lookups whatever the values): re-planning it
            // for each batch cost more than running it.
            set_local("plan_cache_mode", "force_generic_plan");
            let moved = kept(
                "WITH j AS (UPDATE ekm.rotation_job SET rows_done = rows_done + $7 \
                            WHERE job_id = $1 AND state = 'running' RETURNING 1) \
                 UPDATE ekm.rotation_cursor \
                 SET next_block = $4, rows_done = rows_done + ($5::bigint[])[array_position($3::name[], col)] \
                 WHERE job_id = $1 AND tbl = $2 AND col = ANY($3::name[]) AND state = 'scanning' AND next_block = $6 \
                   AND EXISTS (SELECT FROM j)",
                &[INT8, pg_sys::OIDOID, pg_sys::TEXTARRAYOID, INT8, pg_sys::INT8ARRAYOID, INT8, INT8],
                true,
                &[
                    job_id.into(),
                    g.tbl.into(),
                    g.names.clone().into(),
                    hi.into(),
                    ns.into(),
                    g.next_block.into(),
                    total.into(),
                ],
                |t| Ok(t.len()),
            )?;
            if moved != g.names.len() {
                return Err(STALE_GROUP.to_string());
            }
            if hi < g.nblocks {
                // the end of the table is decided by a fresh read of its size
                let mut next = g;
                next.next_block = hi;
                GROUP.with(|c| *c.borrow_mut() = Some((kind, next)));
            }
            return Ok(Step::Again);
        }
        // sweeping: what is left in these columns, in one scan
        let left = count_left(table, &g.quoted, pred)?;
        let done: Vec<String> = g
            .names
            .iter()
            .zip(&left)
            .filter(|(_, n)| **n == 0)
            .map(|(c, _)| c.clone())
            .collect();
        if !done.is_empty() {
            catalog::exec(
                "UPDATE ekm.rotation_cursor SET state = 'done', rows_total = rows_done \
                 WHERE job_id = $1 AND tbl = $2::regclass AND col = ANY($3::name[])",
                vec![job_id.into(), g.tbl.into(), done.into()],
            )
            .map_err(|e| e.to_string())?;
        }
        return Ok(if another_pass(job_id, g.tbl, &g.names, &left)? {
            Step::Later
        } else {
            Step::Again
        });
    }

    if encrypt {
        // The sweep found no plaintext left in the column: done.
        return finish(job_id, &kind, &[]);
    }
    // Every cursor is done. Columns registered since the job started get one.
    let added = one_i64(
        "WITH a AS (INSERT INTO ekm.rotation_cursor (job_id, tbl, col, context, blocks_total, blocks_per_batch, rows_total) \
           SELECT $1, r.tbl, r.col, r.context, pg_relation_size(r.tbl) / current_setting('block_size')::bigint, \
                  CASE WHEN c.reltuples < 0 THEN 1 \
                       ELSE greatest(1, (j.batch_size::float8 / greatest(1.0, c.reltuples / greatest(c.relpages, 1)))::int) END, \
                  greatest(c.reltuples, 0)::bigint \
           FROM ekm.registered_column r JOIN pg_class c ON c.oid = r.tbl JOIN ekm.rotation_job j ON j.job_id = $1 \
           WHERE NOT EXISTS (SELECT 1 FROM ekm.rotation_cursor c WHERE c.job_id = $1 AND c.tbl = r.tbl AND c.col = r.col) \
           RETURNING 1) SELECT count(*) FROM a",
        vec![job_id.into()],
    )?;
    if added > 0 {
        FENCE.with(|f| *f.borrow_mut() = None);
        return Ok(Step::Again);
    }
    // The fence: no transaction that was running when the passes ended may
    // still run. Those that began before the switch may still encrypt with
    // the old key; any of them may have copied a value on the old key (read
    // before its row moved: INSERT ... SELECT, an update from another row)
    // and not committed it yet, invisible to the check below. Once they have
    // all ended (or prepared: then the prepared transactions too), what they
    // wrote is committed and the check sees it. They are identified by their
    // virtual transaction ids, not by a comparison of xids: one may take its
    // xid after the fence, and an idle one shows no xmin. Not waited for:
    // autovacuum (it writes no values) and sessions waiting in
    // ekm_rotation_wait without an xid (their transaction cannot commit a
    // write: shmem::register_waiter).
    let e = |e: ekm_core::EkmError| e.to_string();
    let mut fence = match FENCE.with(|f| f.borrow_mut().take()) {
        Some(f) => f,
        None => Fence {
            // every transaction of this database in progress now (each holds
            // the lock on its own virtual transaction id until it ends)
            vxids: catalog::one::<Vec<String>>(
                "SELECT coalesce(array_agg(l.virtualxid), '{}') FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.locktype = 'virtualxid' AND l.virtualxid = l.virtualtransaction \
                   AND a.datid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                   AND a.pid <> pg_backend_pid() AND a.backend_type <> 'autovacuum worker'",
                vec![],
            )
            .map_err(e)?
            .unwrap_or_default(),
            gids: None,
        },
    };
    // Of those, the ones still running, but sessions waiting in
    // ekm_rotation_wait without an xid (they cannot commit a write).
    let (old, pids) = catalog::two::<i64, String>(
        "SELECT count(*), coalesce(string_agg(l.pid::text, ', ' ORDER BY l.pid), '') FROM pg_locks l \
         WHERE l.locktype = 'virtualxid' AND l.virtualxid = l.virtualtransaction AND l.virtualxid = ANY($1) \
           AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = l.pid AND a.pid = ANY($2) AND a.backend_xid IS NULL)",
        vec![fence.vxids.clone().into(), crate::shmem::waiters().into()],
    )
    .map_err(e)?;
    let (old, pids) = (old.unwrap_or(0), pids.unwrap_or_default());
    let mut waiting = Vec::new();
    if old > 0 {
        waiting.push(format!(
            "{old} transactions that were running when the last pass ended (pids {pids})"
        ));
    } else {
        // Then the prepared transactions there are now: some of those may
        // have been prepared by them.
        if fence.gids.is_none() {
            fence.gids = Some(
                catalog::one::<Vec<String>>(
                    "SELECT coalesce(array_agg(gid), '{}') FROM pg_prepared_xacts WHERE database = current_database()",
                    vec![],
                )
                .map_err(e)?
                .unwrap_or_default(),
            );
        }
        let (prepared, gids) = catalog::two::<i64, String>(
            "SELECT count(*), coalesce(string_agg(pg_catalog.quote_literal(gid), ', ' ORDER BY gid), '') FROM pg_prepared_xacts \
             WHERE database = current_database() AND gid = ANY($1)",
            vec![fence.gids.clone().unwrap_or_default().into()],
        )
        .map_err(e)?;
        if prepared.unwrap_or(0) > 0 {
            waiting.push(format!(
                "{} prepared transactions (gids {}; COMMIT PREPARED or ROLLBACK PREPARED them)",
                prepared.unwrap_or(0),
                gids.unwrap_or_default()
            ));
        }
    }
    FENCE.with(|f| *f.borrow_mut() = Some(fence));
    if !waiting.is_empty() {
        catalog::exec(
            "UPDATE ekm.rotation_job SET waiting_for = $2 WHERE job_id = $1 AND waiting_for IS DISTINCT FROM $2",
            vec![
                job_id.into(),
                format!("{}: they may still write values on the old key; the job retires it when they end", waiting.join(" and ")).into(),
            ],
        )
        .map_err(|e| e.to_string())?;
        return Ok(Step::Later);
    }
    catalog::exec(
        "UPDATE ekm.rotation_job SET waiting_for = NULL WHERE job_id = $1 AND waiting_for IS NOT NULL",
        vec![job_id.into()],
    )
    .map_err(|e| e.to_string())?;
    // Checked, not assumed: nothing left on a rotating key in any registered
    // column (one scan per table for all its registered columns).
    let tables = Spi::connect(|c| -> pgrx::spi::SpiResult<Vec<(pg_sys::Oid, String, Vec<String>, Vec<String>)>> {
        let mut v = Vec::new();
        for r in c.select(
            "SELECT tbl::oid, tbl::regclass::text, array_agg(pg_catalog.quote_ident(col) ORDER BY col), array_agg(col::text ORDER BY col) \
             FROM ekm.registered_column GROUP BY tbl ORDER BY 1",
            None,
            &[],
        )? {
            v.push((
                r.get::<pg_sys::Oid>(1)?.unwrap_or_default(),
                r.get::<String>(2)?.unwrap_or_default(),
                r.get::<Vec<String>>(3)?.unwrap_or_default(),
                r.get::<Vec<String>>(4)?.unwrap_or_default(),
            ));
        }
        Ok(v)
    })
    .map_err(spi_err)?;
    for (tbl, _, quoted, names) in &tables {
        let t = catalog::Table::require(*tbl).map_err(|e| e.to_string())?;
        let left = count_left(&t, quoted, "pg_temp._ekm_on_rotating_key")?;
        if another_pass(job_id, *tbl, names, &left)? {
            return Ok(Step::Later);
        }
    }
    let retired = Spi::connect_mut(|c| -> pgrx::spi::SpiResult<Vec<String>> {
        let mut v = Vec::new();
        for r in c.update(
            "UPDATE ekm.key SET rotation_status = 'retired', retired_at = now() WHERE rotation_status = 'rotating' RETURNING key_id",
            None,
            &[],
        )? {
            v.push(r.get::<String>(1)?.unwrap_or_default());
        }
        Ok(v)
    })
    .map_err(spi_err)?;
    finish(job_id, &kind, &retired)
}

/// How many values in each of `quoted` (identifiers quoted by PostgreSQL)
/// the predicate function `pred` still matches in `table`: one scan, as the
/// table's owner (security-restricted), like the batches.
fn count_left(table: &catalog::Table, quoted: &[String], pred: &str) -> Result<Vec<i64>, String> {
    let counts = quoted
        .iter()
        .map(|q| format!("pg_catalog.count(*) FILTER (WHERE {pred}({q}))"))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!("SELECT {counts} FROM {}", table.qualified);
    let _gate = crate::fastpath::BatchGate::open(&[]);
    table
        .as_owner(|| {
            Spi::connect(|c| -> pgrx::spi::SpiResult<Vec<i64>> {
                let t = c.select(&sql, Some(1), &[])?;
                let r = t.first();
                (1..=quoted.len())
                    .map(|i| r.get::<i64>(i).map(|v| v.unwrap_or(0)))
                    .collect()
            })
        })
        .map_err(spi_err)
}

/// Sends the columns of `tbl` with values left (skipped locked rows, rows
/// moved behind the cursor) back for another pass; whether there were any.
fn another_pass(
    job_id: i64,
    tbl: pg_sys::Oid,
    names: &[String],
    left: &[i64],
) -> Result<bool, String> {
    let (cols, n): (Vec<String>, Vec<i64>) = names
        .iter()
        .zip(left)
        .filter(|(_, n)| **n > 0)
        .map(|(c, n)| (c.clone(), *n))
        .unzip();
    if cols.is_empty() {
        return Ok(false);
    }
    catalog::exec(
        "UPDATE ekm.rotation_cursor c SET state = 'scanning', next_block = 0, passes = passes + 1, skipped_locked = u.n, \
                blocks_total = pg_relation_size(c.tbl) / current_setting('block_size')::bigint \
         FROM unnest($3::name[], $4::bigint[]) AS u(col, n) \
         WHERE c.job_id = $1 AND c.tbl = $2::regclass AND c.col = u.col",
        vec![job_id.into(), tbl.into(), cols.into(), n.into()],
    )
    .map_err(|e| e.to_string())?;
    Ok(true)
}

/// Marks the job done, audits and notifies.
fn finish(job_id: i64, kind: &str, retired: &[String]) -> Result<Step, String> {
    // durable before anyone hears of it (the batches commit asynchronously)
    Spi::run("SET LOCAL synchronous_commit = on").map_err(spi_err)?;
    let rows = one_i64(
        "UPDATE ekm.rotation_job SET state = 'done', finished_at = clock_timestamp(), waiting_for = NULL WHERE job_id = $1 RETURNING rows_done",
        vec![job_id.into()],
    )?;
    let event = match kind {
        "encrypt" => "column_encrypted",
        "rollback" => "rollback_done",
        _ => "rotation_done",
    };
    catalog::audit(
        event,
        None,
        &catalog::json_object(&[
            ("job_id", &job_id.to_string()),
            ("kind", kind),
            ("rows", &rows.to_string()),
            ("retired", &retired.join(",")),
        ]),
    )
    .map_err(|e| e.to_string())?;
    notify(job_id, kind, "done")?;
    pgrx::log!(
        "ekm: {kind} job {job_id} done: {rows} values {}{}",
        if kind == "encrypt" {
            "encrypted"
        } else {
            "re-encrypted"
        },
        if retired.is_empty() {
            String::new()
        } else {
            format!(", retired {}", retired.join(", "))
        }
    );
    Ok(Step::Stop)
}
