//! Background workers: the per-database rotation worker (one batch per
//! transaction, docs/design.md section 5) and the launcher that resumes
//! unfinished jobs after a server restart.
use crate::jobs::helpers;
use crate::jobs::notify::notify;
use crate::jobs::protocol::Step;
use crate::keys::catalog;
use crate::pg::spi::{self, err_text as spi_err};
use crate::pg::xact::transaction;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, BgWorkerStartTime,
    DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::prelude::*;
use std::time::Duration;

/// Starts a rotation worker for `job_id` (0: whatever job is running) in this database.
pub fn launch(job_id: i64) -> Result<(), String> {
    launch_in(unsafe { pg_sys::MyDatabaseId }, job_id)
}

fn launch_in(db: pg_sys::Oid, job_id: i64) -> Result<(), String> {
    start_in(db, job_id).map(|_| ())
}

fn start_in(db: pg_sys::Oid, job_id: i64) -> Result<DynamicBackgroundWorker, String> {
    helpers::start(db, job_id, false)
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
    let mut next_check = std::time::Instant::now() + crate::pg::gucs::auto_rotate_naptime();
    let mut warned_for = String::new();
    // the maintenance worker last started in each database: never a second
    // one while it runs (one stuck behind a lock must not fill the server's
    // worker slots)
    let mut maintenance: std::collections::HashMap<u32, DynamicBackgroundWorker> =
        std::collections::HashMap::new();
    loop {
        let wait = next_check
            .saturating_duration_since(std::time::Instant::now())
            .min(Duration::from_secs(1));
        if !BackgroundWorker::wait_latch(Some(wait)) {
            break;
        }
        if helpers::reload_config_if_asked() {
            // a shorter naptime applies at once
            next_check =
                next_check.min(std::time::Instant::now() + crate::pg::gucs::auto_rotate_naptime());
        }
        if std::time::Instant::now() < next_check {
            continue;
        }
        next_check = std::time::Instant::now() + crate::pg::gucs::auto_rotate_naptime();
        // Databases to visit: those with encryption counts to write down,
        // and, with automatic rotation on, the listed ones.
        let pending: Vec<u32> = crate::keys::shmem::databases_with_pending();
        let auto = crate::pg::gucs::auto_rotate();
        if pending.is_empty() && !auto {
            continue;
        }
        let names = if auto {
            crate::pg::gucs::auto_rotate_databases()
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
            if let Some(w) = maintenance.get(&db.to_u32()) {
                match w.pid() {
                    Err(BackgroundWorkerStatus::Stopped) => {}
                    Err(BackgroundWorkerStatus::PostmasterDied) => return,
                    _ => {
                        pgrx::log!(
                            "ekm launcher: the maintenance worker of database {name} is still running; not starting another"
                        );
                        continue;
                    }
                }
            }
            match start_in(db, MAINTENANCE_JOB) {
                Ok(w) => {
                    maintenance.insert(db.to_u32(), w);
                }
                Err(e) => pgrx::warning!(
                    "ekm launcher: cannot start the maintenance worker in database {name}: {e}"
                ),
            }
        }
    }
}

/// The job argument that asks a worker to write down encryption counts and,
/// with automatic rotation on for this database, rotate a due key.
const MAINTENANCE_JOB: i64 = -1;

/// Applies a configuration reload (SIGHUP), if one was asked for.
/// The rotation worker. `arg` is the job id (0: the running job, if any).
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn ekm_rotation_worker_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let db: u32 = BackgroundWorker::get_extra().parse().unwrap_or(0);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(db)), None);
    if !helpers::prepare_session() {
        return;
    }
    // A new library before ALTER EXTENSION ekm UPDATE: jobs wait for it.
    if let Ok(Some(why)) = transaction(|| {
        let installed = Spi::get_one::<bool>("SELECT to_regclass('ekm.rotation_job') IS NOT NULL")
            .map_err(spi_err)?
            .unwrap_or(false);
        Ok(if installed {
            catalog::require_current_objects()
                .err()
                .map(|e| e.to_string())
        } else {
            None
        })
    }) {
        pgrx::log!("ekm: no job runs in this database until ALTER EXTENSION ekm UPDATE: {why}");
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
            crate::keys::lifecycle::flush_encryption_counts().map_err(|e| e.to_string())?;
            let db = Spi::get_one::<String>("SELECT current_database()::text")
                .map_err(spi_err)?
                .unwrap_or_default();
            if !crate::pg::gucs::auto_rotate()
                || !crate::pg::gucs::auto_rotate_databases().contains(&db)
            {
                return Ok(Err(
                    "automatic rotation is off for this database".to_string()
                ));
            }
            crate::jobs::start::auto_rotate().map_err(|e| e.to_string())
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
                // every running job resumes: a rotation and a scan of the
                // database may both run; this worker takes the first and
                // starts one for each other
                let all = spi::one::<Vec<i64>>(
                    "SELECT coalesce(array_agg(job_id ORDER BY job_id), '{}') FROM ekm.rotation_job WHERE state = 'running'",
                    vec![],
                )
                .map_err(|e| e.to_string())?
                .unwrap_or_default();
                for other in all.iter().skip(1) {
                    launch_or_warn(*other);
                }
                Ok(all.first().copied())
            } else {
                spi::one::<i64>(
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
    // a lock only ekm's workers take (src/locks.rs): no other session can
    // keep the job from its worker
    let locked = transaction(|| {
        Ok(crate::keys::locks::try_lock_session(
            crate::keys::locks::EkmLock::Job(job_id),
        ))
    })
    .unwrap_or(false);
    if !locked {
        pgrx::log!("ekm: rotation job {job_id}: another worker runs it; this one exits");
        return;
    }
    if let Err((_, msg)) = transaction(helpers::create_batch_functions) {
        pgrx::warning!("ekm: rotation job {job_id}: cannot create the batch functions: {msg}");
        return;
    }
    pgrx::log!("ekm: rotation job {job_id}: worker started");
    // Batches commit without waiting for their WAL to reach disk: a crash
    // can lose the last few, and with them their cursor update (same WAL
    // stream), so the resumed job redoes them. The transaction that retires
    // the old key and marks the job done commits synchronously (finish).
    let _ = transaction(|| Spi::run("SET synchronous_commit = off").map_err(spi_err));

    // whether the last step made progress (batches): the throttle is asked
    // before the next one
    let mut busy = false;
    loop {
        let (r, extra) = match helpers::turn(job_id, false, &mut busy) {
            helpers::Turn::Waited => continue,
            helpers::Turn::Stopped => {
                pgrx::log!("ekm: rotation job {job_id}: worker stopping; the job resumes with ekm_rotation_resume({job_id}) or at server start");
                break;
            }
            helpers::Turn::Step(r, extra) => (r, extra),
        };
        let pause = match r {
            Ok(Step::Again) => crate::pg::gucs::rotation_batch_pause() + extra,
            Ok(Step::Later) => crate::pg::gucs::rotation_retry_pause(),
            Ok(Step::Soon) => helpers::SOON,
            Ok(Step::Nodes) => helpers::NODES.min(crate::pg::gucs::rotation_retry_pause()),
            Ok(Step::Stop) => break,
            Err((code, msg)) => match helpers::retry_after(job_id, &code, &msg) {
                Some(p) => p,
                None => {
                    fail_job(job_id, &code, msg);
                    break;
                }
            },
        };
        if !BackgroundWorker::wait_latch(Some(pause)) {
            pgrx::log!("ekm: rotation job {job_id}: worker stopping; the job resumes with ekm_rotation_resume({job_id}) or at server start");
            break;
        }
    }
    wake_waiters();
}

/// A step failed with an error batches do not retry: the job is marked
/// `failed` (resumable), audited, NOTIFYed and logged at WARNING.
fn fail_job(job_id: i64, code: &str, msg: String) {
    // an application table's own code (a trigger, a constraint,
    // an index expression) that relied on the search_path
    let msg = if code.contains("UNDEFINED_TABLE")
        || code.contains("UNDEFINED_FUNCTION")
        || code.contains("UNDEFINED_OBJECT")
    {
        let path = match crate::pg::gucs::batch_search_path() {
            Some(p) => format!("ekm.batch_search_path = {p}"),
            None => "the search_path that role gets when it logs in to this database".into(),
        };
        format!(
                "{msg} (ekm's batches run a table's triggers, constraints and defaults as the table's owner, with {path}: \
                 make what that code uses reachable from it (ALTER ROLE <owner> IN DATABASE <database> SET search_path = ...), \
                 or schema-qualify it, or set the function's own search_path (ALTER FUNCTION ... SET search_path = ...); \
                 then SELECT ekm_rotation_resume({job_id}))"
            )
    } else {
        msg
    };
    pgrx::warning!("ekm: rotation job {job_id} failed: {msg}");
    let _ = transaction(|| {
        spi::exec(
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
        let kind = spi::one::<String>(
            "SELECT kind FROM ekm.rotation_job WHERE job_id = $1",
            vec![job_id.into()],
        )
        .map_err(|e| e.to_string())?
        .unwrap_or_default();
        notify(job_id, &kind, "failed")
    });
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
