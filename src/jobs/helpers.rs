//! What a job's own worker and its helpers share, and the helpers
//! themselves (`ekm.rotation_workers`, docs/design.md section 5, "Workers").
//!
//! A helper is a background worker that takes tables (and partitions) of a
//! job that no other worker has claimed (`protocol::next_group`, ekm's claim
//! lock) and runs their batches, ends of passes and sweeps; it exits when no
//! table is left for it. It never settles: the checks, the fence and the
//! final step are the job's own worker's, which starts helpers when it picks
//! a table and others are left.

use crate::jobs::protocol::{self, Step, SKIP_LOCKED_NEXT, STALE_GROUP};
use crate::keys::catalog;
use crate::pg::owner;
use crate::pg::spi::err_text as spi_err;
use crate::pg::xact::transaction;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, DynamicBackgroundWorker,
    SignalWakeFlags,
};
use pgrx::prelude::*;
use std::time::Duration;

/// How long a worker waits when every table left is another worker's.
pub(crate) const SOON: Duration = Duration::from_millis(50);

/// How long a Citus coordinator's job waits before it asks the worker nodes
/// again (at most ekm.rotation_retry_pause): each call is a transaction on
/// every node.
pub(crate) const NODES: Duration = Duration::from_millis(200);

thread_local! {
    /// The helpers this job's worker started.
    static HELPERS: std::cell::RefCell<Vec<DynamicBackgroundWorker>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A worker's session: `search_path = pg_catalog, pg_temp` and READ
/// COMMITTED for its own statements.
pub(crate) fn prepare_session() -> bool {
    // The worker is a superuser: nothing planted in a schema of the
    // database's or the role's search_path may be picked up by its SQL.
    // (and reads with READ COMMITTED whatever the database's or role's
    // default: each step must see what committed before it began)
    transaction(|| {
        Spi::run("SET search_path = pg_catalog, pg_temp; SET default_transaction_isolation = 'read committed'")
            .map_err(spi_err)
    })
    .is_ok()
}

pub(crate) fn reload_config_if_asked() -> bool {
    let asked = BackgroundWorker::sighup_received();
    if asked {
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        owner::forget_server_search_path();
    }
    asked
}

/// What one turn of a worker's loop did.
pub(crate) enum Turn {
    /// the throttle held the worker back; it waited (ask again)
    Waited,
    /// a SIGTERM came while it waited: stop
    Stopped,
    /// a step ran, in a transaction of its own; after it, the throttle's
    /// pause comes on top of the usual one
    Step(Result<Step, (String, String)>, Duration),
}

/// One turn of a worker's loop (the job's own, `helper` false, or a
/// helper's): the configuration if a reload was asked; the throttle when
/// the last step made progress (`busy`); else a step, then helpers for the
/// tables left (the job's own worker), then the vacuum the step made due.
pub(crate) fn turn(job_id: i64, helper: bool, busy: &mut bool) -> Turn {
    let _ = reload_config_if_asked();
    let mut ratio = 0.0;
    if *busy {
        match crate::jobs::pace::throttle(job_id) {
            crate::jobs::pace::Throttle::Wait(wait) => {
                return if BackgroundWorker::wait_latch(Some(wait)) {
                    Turn::Waited
                } else {
                    Turn::Stopped
                };
            }
            crate::jobs::pace::Throttle::Go(r) => ratio = r,
        }
    }
    let started = std::time::Instant::now();
    let r = transaction(|| protocol::step(job_id, helper));
    *busy = matches!(r, Ok(Step::Again));
    if !helper {
        if let Some(others) = protocol::take_others_left() {
            maintain(job_id, others);
        }
    }
    if r.is_err() {
        crate::jobs::pace::step_failed();
    }
    // the vacuum behind the batches, when one is due (pace.rs)
    crate::jobs::pace::vacuum_if_due(job_id);
    // the step and its vacuum are what the application competes with
    let extra = started.elapsed().mul_f64(ratio);
    Turn::Step(r, extra)
}

/// Starts a background worker for job `job_id` in database `db`: the job's
/// own (`ekm_rotation_worker_main`) or a helper.
pub(crate) fn start(
    db: pg_sys::Oid,
    job_id: i64,
    helper: bool,
) -> Result<DynamicBackgroundWorker, String> {
    let (what, function) = if helper {
        ("ekm rotation helper", "ekm_rotation_helper_main")
    } else {
        ("ekm rotation", "ekm_rotation_worker_main")
    };
    BackgroundWorkerBuilder::new(&format!("{what} job {job_id} (database {})", db.to_u32()))
        .set_type(what)
        .set_library("ekm")
        .set_function(function)
        .set_argument(Some(pg_sys::Datum::from(job_id)))
        .set_extra(&db.to_u32().to_string())
        .enable_spi_access()
        .load_dynamic()
        .map_err(|e| format!("{e:?}"))
}

/// Whether a table job `job_id` has cursors on no longer exists.
fn table_dropped(job_id: i64) -> bool {
    transaction(|| {
        Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT 1 FROM ekm.rotation_cursor c WHERE c.job_id = $1 \
                              AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class r WHERE r.oid = c.tbl::oid))",
            &[job_id.into()],
        )
        .map_err(spi_err)
    })
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// A step failed because of another server: the job says what it waits for
/// (`waiting_for`) and waits at least a second before the next step.
fn wait_for(job_id: i64, what: String) -> Duration {
    let _ = transaction(|| {
        Spi::run_with_args(
            "UPDATE ekm.rotation_job SET waiting_for = $2 WHERE job_id = $1 AND state = 'running' AND waiting_for IS DISTINCT FROM $2",
            &[job_id.into(), what.clone().into()],
        )
        .map_err(spi_err)
    });
    pgrx::log!("ekm: rotation job {job_id}: waiting: {what}");
    crate::pg::gucs::rotation_retry_pause().max(Duration::from_secs(1))
}

/// After a step failed with `code`/`msg`: how long to wait before the next
/// one, if the failure is one a batch retries (None: the job fails).
pub(crate) fn retry_after(job_id: i64, code: &str, msg: &str) -> Option<Duration> {
    if msg == STALE_GROUP {
        Some(Duration::ZERO)
    } else if code.contains("LOCK_NOT_AVAILABLE") {
        // an application holds a row of this batch: redo it at once,
        // skipping locked rows (a later pass takes them)
        SKIP_LOCKED_NEXT.with(|s| s.set(true));
        Some(Duration::ZERO)
    } else if code.contains("UNDEFINED_TABLE") && table_dropped(job_id) {
        // a table of the job was dropped under a batch (a Citus placement
        // moved away and dropped): the next step finds it gone and removes
        // its cursors (protocol::dropped_table)
        Some(Duration::ZERO)
    } else if msg.contains(crate::jobs::cluster::NOT_VERIFIED) {
        // a Citus worker node refused the retire: its part is not verified
        // (a shard moved there since its check, say); the job checks every
        // node again and retires once they are (docs/design.md, section 9)
        Some(wait_for(job_id, format!("a worker node: {msg}")))
    } else if code.contains("CONNECTION") || code.contains("SQLCLIENT_UNABLE") {
        // another server cannot be reached (a Citus worker node the key
        // change must reach, say): the job waits for it, it does not fail;
        // nothing of the step committed anywhere
        Some(wait_for(
            job_id,
            format!("a server that cannot be reached: {msg}"),
        ))
    } else if code.contains("DEADLOCK") || code.contains("SERIALIZATION") {
        pgrx::log!("ekm: rotation job {job_id}: batch skipped ({msg}); retrying");
        SKIP_LOCKED_NEXT.with(|s| s.set(true));
        Some(crate::pg::gucs::rotation_retry_pause())
    } else {
        None
    }
}

/// Starts helpers, up to `ekm.rotation_workers` - 1 running at once and no
/// more than the `others` tables left beside the one this worker took.
pub(crate) fn maintain(job_id: i64, others: usize) {
    let wanted = (crate::pg::gucs::rotation_workers() as usize - 1).min(others);
    HELPERS.with(|h| {
        let mut h = h.borrow_mut();
        h.retain(|w| {
            matches!(
                w.pid(),
                Ok(_) | Err(BackgroundWorkerStatus::NotYetStarted)
            )
        });
        while h.len() < wanted {
            match start(unsafe { pg_sys::MyDatabaseId }, job_id, true) {
                Ok(w) => h.push(w),
                Err(e) => {
                    // no free worker slot: the job goes on with fewer
                    pgrx::log!("ekm: rotation job {job_id}: could not start a helper ({e}); going on with {} workers", h.len() + 1);
                    break;
                }
            }
        }
    });
}

/// A helper of job `arg`: batches of the tables no other worker has.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn ekm_rotation_helper_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let db: u32 = BackgroundWorker::get_extra().parse().unwrap_or(0);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(db)), None);
    let job_id = arg.value() as i64;
    if !prepare_session() {
        return;
    }
    let ready = transaction(|| {
        catalog::require_current_objects().map_err(|e| e.to_string())?;
        create_batch_functions()
    });
    if let Err((_, msg)) = ready {
        pgrx::log!("ekm: rotation job {job_id}: helper not started: {msg}");
        return;
    }
    let _ = transaction(|| Spi::run("SET synchronous_commit = off").map_err(spi_err));
    pgrx::log!("ekm: rotation job {job_id}: helper started");
    let mut busy = false;
    loop {
        let (r, extra) = match turn(job_id, true, &mut busy) {
            Turn::Waited => continue,
            Turn::Stopped => break,
            Turn::Step(r, extra) => (r, extra),
        };
        let pause = match r {
            Ok(Step::Again) => crate::pg::gucs::rotation_batch_pause() + extra,
            Ok(Step::Later) => crate::pg::gucs::rotation_retry_pause(),
            Ok(Step::Soon) | Ok(Step::Nodes) | Ok(Step::Stop) => break,
            Err((code, msg)) => match retry_after(job_id, &code, &msg) {
                Some(p) => p,
                None => {
                    // the job's own worker meets the same rows and decides
                    pgrx::log!("ekm: rotation job {job_id}: helper stops: {msg}; the job's worker takes its table over");
                    break;
                }
            },
        };
        if !BackgroundWorker::wait_latch(Some(pause)) {
            break;
        }
    }
    protocol::release_claim();
    pgrx::log!("ekm: rotation job {job_id}: helper done");
}

/// The per-value functions the batches call, created in this worker's own
/// temporary schema. Batches run as the owner of each table
/// (`owner::as_table_owner`), who needs EXECUTE on what the batch calls:
/// a function in this backend's temporary schema can be called by every
/// role of this backend and by no other backend, so nothing of ekm is
/// granted to PUBLIC or to table owners. The functions also refuse to act
/// outside a batch of this worker (`fastpath::BatchGate`), so a trigger
/// that runs during a batch cannot use them for anything but the batch's
/// own columns. They disappear with the worker.
pub(crate) fn create_batch_functions() -> Result<(), String> {
    citus_session()?;
    Spi::run(
        "CREATE FUNCTION pg_temp._ekm_rotate_value(pg_catalog.text, pg_catalog.text, pg_catalog.int4, pg_catalog.int8) RETURNS pg_catalog.text \
           AS '$libdir/ekm', 'ekm_rotate_value_v1' LANGUAGE c VOLATILE STRICT; \
         CREATE FUNCTION pg_temp._ekm_on_rotating_key(pg_catalog.text) RETURNS pg_catalog.bool \
           AS '$libdir/ekm', 'ekm_on_rotating_key_v1' LANGUAGE c STABLE STRICT; \
         CREATE FUNCTION pg_temp._ekm_encrypt_plain(pg_catalog.text, pg_catalog.text, pg_catalog.int4, pg_catalog.int8) RETURNS pg_catalog.text \
           AS '$libdir/ekm', 'ekm_encrypt_plain_v1' LANGUAGE c VOLATILE STRICT; \
         CREATE FUNCTION pg_temp._ekm_is_plaintext(pg_catalog.text) RETURNS pg_catalog.bool \
           AS '$libdir/ekm', 'ekm_is_plaintext_v1' LANGUAGE c IMMUTABLE STRICT; \
         CREATE FUNCTION pg_temp._ekm_left(pg_catalog.text, pg_catalog.text) RETURNS pg_catalog.int4 \
           AS '$libdir/ekm', 'ekm_left_v1' LANGUAGE c STABLE STRICT; \
         CREATE FUNCTION pg_temp._ekm_keys_in(pg_catalog.text) RETURNS pg_catalog.text[] \
           AS '$libdir/ekm', 'ekm_keys_in_v1' LANGUAGE c IMMUTABLE STRICT; \
         GRANT EXECUTE ON FUNCTION pg_temp._ekm_rotate_value(pg_catalog.text, pg_catalog.text, pg_catalog.int4, pg_catalog.int8), \
           pg_temp._ekm_on_rotating_key(pg_catalog.text), \
           pg_temp._ekm_encrypt_plain(pg_catalog.text, pg_catalog.text, pg_catalog.int4, pg_catalog.int8), \
           pg_temp._ekm_is_plaintext(pg_catalog.text), \
           pg_temp._ekm_left(pg_catalog.text, pg_catalog.text), \
           pg_temp._ekm_keys_in(pg_catalog.text) TO PUBLIC",
    )
    .map_err(spi_err)?;
    Ok(())
}

/// On a Citus node, a job's tables include shard placements (section 9):
/// Citus hides them from the catalog queries of a session like this one,
/// refuses changes to them unless asked, and would send this session's
/// temporary functions to other nodes (refused on a worker node). For this
/// session only.
fn citus_session() -> Result<(), String> {
    let citus = Spi::get_one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus')",
    )
    .map_err(spi_err)?
    .unwrap_or(false);
    if citus {
        Spi::run(
            "SELECT pg_catalog.set_config('citus.show_shards_for_app_name_prefixes', '*', false), \
                    pg_catalog.set_config('citus.enable_manual_changes_to_shards', 'on', false), \
                    pg_catalog.set_config('citus.enable_ddl_propagation', 'off', false)",
        )
        .map_err(spi_err)?;
    }
    Ok(())
}
