//! The pace of a job's batches (docs/design.md, section 5, "Pace"):
//!
//! * the vacuum behind them: every row a batch rewrites leaves its old
//!   version behind, and a table whose pages are full puts each new version
//!   on a new page, so a pass would double the table. After enough batches
//!   (`ekm_core::pace::vacuum_every`, from the table's size and
//!   `ekm.rotation_vacuum_growth`) the worker vacuums the table between two
//!   transactions; later batches reuse the space it freed.
//! * the throttle: the worker pauses while a standby's replay lags more than
//!   `ekm.rotation_max_replica_lag`, while more client sessions than
//!   `ekm.rotation_max_active_sessions` run a statement, and paces its
//!   batches to keep the application's write throughput at
//!   `ekm.rotation_target_app_share` of what it is without them
//!   (`ekm_core::pace::ShareController`). What throttles it shows in
//!   `ekm.rotation_progress.throttled_by`.

use crate::pg::gucs;
use crate::pg::spi::{self, one_i64};
use crate::pg::xact::transaction;
use ekm_core::pace::{Pace, ShareController};
use pgrx::prelude::*;
use std::cell::RefCell;
use std::time::{Duration, Instant};

/// Batches since the last vacuum of the table being worked on.
struct Since {
    tbl: pg_sys::Oid,
    /// full batches' worth of rewritten values since the last vacuum
    batches: f64,
    /// the transaction id of the first of them: a snapshot older than it
    /// keeps the vacuum from freeing what they left behind
    first_xid: u32,
}

/// A vacuum the worker runs after the current transaction commits.
pub(crate) struct Due {
    tbl: pg_sys::Oid,
    first_xid: u32,
}

thread_local! {
    static SINCE: RefCell<Option<Since>> = const { RefCell::new(None) };
    /// the most values one batch of a table moved: a full batch
    static FULL: RefCell<std::collections::HashMap<pg_sys::Oid, i64>> = RefCell::new(std::collections::HashMap::new());
    static DUE: RefCell<Option<Due>> = const { RefCell::new(None) };
    /// what `throttled_by` says now (this worker wrote it)
    static THROTTLED_BY: RefCell<Option<String>> = const { RefCell::new(None) };
    static CONTROLLER: RefCell<Option<ShareController>> = const { RefCell::new(None) };
    static STARTED: RefCell<Option<Instant>> = const { RefCell::new(None) };
}

/// The blocks the next batch of a table of `table_blocks` covers
/// (`ekm_core::pace::batch_blocks`).
pub(crate) fn batch_blocks(blocks_per_batch: i64, table_blocks: i64) -> i64 {
    ekm_core::pace::batch_blocks(
        blocks_per_batch,
        table_blocks,
        gucs::rotation_vacuum_growth(),
    )
}

/// Called by a batch that committed its bookkeeping (in its transaction):
/// counts what it rewrote (`moved` values; a batch of a later pass that
/// finds a few values left counts for that much of a full batch, the most
/// one batch of the table moved), and makes a vacuum due when the batches
/// since the last one rewrote `ekm.rotation_vacuum_growth` of the table.
pub(crate) fn batch_done(tbl: pg_sys::Oid, table_blocks: i64, blocks_per_batch: i64, moved: i64) {
    if moved <= 0 {
        return;
    }
    let full = FULL.with(|f| {
        let mut f = f.borrow_mut();
        let e = f.entry(tbl).or_insert(0);
        *e = (*e).max(moved);
        *e
    });
    let weight = moved as f64 / full as f64;
    let Some(every) = ekm_core::pace::vacuum_every(
        table_blocks,
        blocks_per_batch,
        gucs::rotation_vacuum_growth(),
    ) else {
        SINCE.with(|s| *s.borrow_mut() = None);
        return;
    };
    let xid = u32::from(unsafe { pg_sys::GetTopTransactionIdIfAny() });
    SINCE.with(|s| {
        let mut s = s.borrow_mut();
        match s.as_mut() {
            Some(c) if c.tbl == tbl => c.batches += weight,
            _ => {
                // another table: what the last one's batches left is vacuumed too
                if let Some(prev) = s.take() {
                    DUE.with(|d| {
                        *d.borrow_mut() = Some(Due {
                            tbl: prev.tbl,
                            first_xid: prev.first_xid,
                        })
                    });
                }
                *s = Some(Since {
                    tbl,
                    batches: weight,
                    first_xid: xid,
                });
            }
        }
        if s.as_ref().is_some_and(|c| c.batches >= every as f64) {
            let c = s.take().expect("just counted");
            DUE.with(|d| {
                *d.borrow_mut() = Some(Due {
                    tbl: c.tbl,
                    first_xid: c.first_xid,
                })
            });
        }
    });
}

/// A pass over `tbl` ended: the batches since the last vacuum are
/// vacuumed behind (a later pass, the checks and the application find the
/// table without their dead rows).
pub(crate) fn pass_ended(tbl: pg_sys::Oid) {
    SINCE.with(|s| {
        let mut s = s.borrow_mut();
        if s.as_ref().is_some_and(|c| c.tbl == tbl && c.batches > 0.0) {
            let c = s.take().expect("checked");
            DUE.with(|d| {
                *d.borrow_mut() = Some(Due {
                    tbl: c.tbl,
                    first_xid: c.first_xid,
                })
            });
        }
    });
}

/// A step's transaction failed: a vacuum it made due is not (its batch did
/// not commit; the count goes on from the batches that did).
pub(crate) fn step_failed() {
    DUE.with(|d| d.borrow_mut().take());
}

/// Runs the vacuum that is due, if one is, between transactions; records it
/// in the job (`vacuums`, and `vacuum_note` when something held the space
/// back).
pub(crate) fn vacuum_if_due(job_id: i64) {
    let Some(due) = DUE.with(|d| d.borrow_mut().take()) else {
        return;
    };
    // an index on a column the job rewrites (or an expression index, which
    // may use one) gets a new entry for every row: its dead entries are
    // removed at every vacuum, for the new ones to reuse the space
    let index_cleanup = transaction(|| {
        spi::one::<bool>(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_index i WHERE i.indrelid = $1 AND (i.indexprs IS NOT NULL OR EXISTS ( \
                 SELECT FROM ekm.registered_column r JOIN pg_catalog.pg_attribute a ON a.attrelid = r.tbl AND a.attname = r.col \
                 WHERE r.tbl = $1::pg_catalog.regclass AND a.attnum = ANY (i.indkey::pg_catalog.int2[]))))",
            vec![due.tbl.into()],
        )
        .map_err(|e| e.to_string())
    })
    .ok()
    .flatten()
    .unwrap_or(true);
    let r = crate::pg::vacuum::vacuum_table(due.tbl, index_cleanup);
    let _ = transaction(|| {
        let note = match &r {
            Ok(true) => held_back_by(due.first_xid)?,
            Ok(false) => None, // the table is gone
            Err(msg) => {
                pgrx::warning!(
                    "ekm: rotation job {job_id}: the vacuum behind the batches failed: {msg}"
                );
                Some(format!(
                    "the last vacuum behind the batches failed ({msg}): the table may grow until a vacuum succeeds"
                ))
            }
        };
        spi::exec(
            "UPDATE ekm.rotation_job SET vacuums = vacuums + $2, vacuum_note = $3 \
             WHERE job_id = $1 AND (vacuums, vacuum_note) IS DISTINCT FROM (vacuums + $2, $3)",
            vec![
                job_id.into(),
                (if matches!(r, Ok(true)) { 1i32 } else { 0i32 }).into(),
                note.into(),
            ],
        )
        .map_err(|e| e.to_string())
    });
}

/// What keeps a vacuum from freeing the row versions that batches from
/// transaction `first_xid` on left behind: the oldest session, prepared
/// transaction or replication slot whose snapshot (xmin) or transaction is
/// not newer than it. None when nothing does.
fn held_back_by(first_xid: u32) -> Result<Option<String>, String> {
    if first_xid == 0 {
        return Ok(None);
    }
    let who = spi::one::<String>(
        "WITH h AS ( \
           SELECT 'session ' || a.pid || ' (' || coalesce(a.usename::text, a.backend_type) || ', ' || coalesce(a.state, 'no state') \
                  || coalesce(', in a transaction since ' || pg_catalog.to_char(a.xact_start, 'YYYY-MM-DD HH24:MI:SS TZ'), '') || ')' \
                  || CASE WHEN a.wait_event_type = 'Extension' AND a.query LIKE '%ekm_rotation_wait%' \
                          THEN ', waiting in ekm_rotation_wait in a statement that reads a table (call it by itself: SELECT * FROM ekm_rotation_wait(<job>)),' \
                          ELSE '' END AS who, \
                  greatest(pg_catalog.age(a.backend_xmin), pg_catalog.age(a.backend_xid)) AS age \
           FROM pg_catalog.pg_stat_activity a \
           WHERE a.pid <> pg_catalog.pg_backend_pid() AND a.backend_type <> 'autovacuum worker' \
             AND (a.datname = pg_catalog.current_database() OR a.backend_type = 'walsender') \
             AND (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL) \
           UNION ALL \
           SELECT 'prepared transaction ' || pg_catalog.quote_literal(p.gid), pg_catalog.age(p.transaction) \
           FROM pg_catalog.pg_prepared_xacts p WHERE p.database = pg_catalog.current_database() \
           UNION ALL \
           SELECT 'replication slot ' || pg_catalog.quote_literal(s.slot_name), pg_catalog.age(s.xmin) \
           FROM pg_catalog.pg_replication_slots s WHERE s.xmin IS NOT NULL) \
         SELECT who FROM h WHERE age >= pg_catalog.age($1::pg_catalog.text::pg_catalog.xid) ORDER BY age DESC LIMIT 1",
        vec![first_xid.to_string().into()],
    )
    .map_err(|e| e.to_string())?;
    Ok(who.map(|w| {
        format!(
            "{w} holds a snapshot older than the batches, so the vacuum behind them cannot free the rows they rewrote: \
             the table grows by what the rotation rewrites until it ends (end or commit that transaction)"
        )
    }))
}

/// The tables' sizes of a job: before (its cursors) and now.
pub(crate) struct Sizes {
    pub heap_before: i64,
    pub heap_after: i64,
    pub toast_before: i64,
    pub toast_after: i64,
    pub vacuums: i64,
}

impl Sizes {
    /// `" (tables 46.5 MB -> 47.1 MB, TOAST 0 bytes -> 0 bytes, 61 vacuums)"`
    pub fn describe(&self) -> String {
        let mb = |b: i64| {
            if b >= 1 << 20 {
                format!("{:.1} MB", b as f64 / (1 << 20) as f64)
            } else {
                format!("{b} bytes")
            }
        };
        format!(
            " (tables {} -> {}, TOAST {} -> {}, {} vacuums)",
            mb(self.heap_before),
            mb(self.heap_after),
            mb(self.toast_before),
            mb(self.toast_after),
            self.vacuums
        )
    }
}

pub(crate) fn job_sizes(job_id: i64) -> Result<Option<Sizes>, String> {
    Spi::connect(|c| -> pgrx::spi::SpiResult<Option<Sizes>> {
        let t = c.select(
            "SELECT sum(hb)::bigint, sum(pg_relation_size(tbl))::bigint, sum(tb)::bigint, \
                    sum((SELECT coalesce(pg_total_relation_size(nullif(p.reltoastrelid, 0)), 0) FROM pg_class p WHERE p.oid = tbl))::bigint, \
                    (SELECT vacuums FROM ekm.rotation_job WHERE job_id = $1)::bigint \
             FROM (SELECT DISTINCT ON (tbl) tbl::oid AS tbl, heap_bytes_before AS hb, toast_bytes_before AS tb \
                   FROM ekm.rotation_cursor WHERE job_id = $1 AND heap_bytes_before IS NOT NULL ORDER BY tbl) x",
            Some(1),
            &[job_id.into()],
        )?;
        let r = t.first();
        Ok(match r.get::<i64>(1)? {
            None => None,
            Some(heap_before) => Some(Sizes {
                heap_before,
                heap_after: r.get::<i64>(2)?.unwrap_or(0),
                toast_before: r.get::<i64>(3)?.unwrap_or(0),
                toast_after: r.get::<i64>(4)?.unwrap_or(0),
                vacuums: r.get::<i64>(5)?.unwrap_or(0),
            }),
        })
    })
    .map_err(|e| e.to_string())
}

/// What the throttle says before the next step.
pub(crate) enum Throttle {
    /// Run no step for this long, then ask again (a limit is exceeded, or
    /// the adaptive pause measures the application alone).
    Wait(Duration),
    /// Run the step, then pause this many times as long as it took, more
    /// than usual, before the next (the adaptive pause).
    Go(f64),
}

/// What the worker does before its next step, for the throttle. Sets or
/// clears the job's `throttled_by`.
pub(crate) fn throttle(job_id: i64) -> Throttle {
    let (max_lag, max_active, target) = gucs::rotation_throttle();
    if max_lag == 0 && max_active == 0 && target <= 0.0 {
        CONTROLLER.with(|c| c.borrow_mut().take());
        set_throttled_by(job_id, None);
        return Throttle::Go(0.0);
    }
    if max_lag > 0 || max_active > 0 {
        let hard = transaction(|| hard_limit(max_lag, max_active)).unwrap_or(None);
        if let Some(why) = hard {
            set_throttled_by(job_id, Some(why));
            return Throttle::Wait(Duration::from_millis(250));
        }
    }
    if target <= 0.0 {
        CONTROLLER.with(|c| c.borrow_mut().take());
        set_throttled_by(job_id, None);
        return Throttle::Go(0.0);
    }
    share_pace(job_id, target)
}

/// The adaptive pause (`ekm.rotation_target_app_share`).
fn share_pace(job_id: i64, target: f64) -> Throttle {
    let start = STARTED.with(|s| *s.borrow_mut().get_or_insert_with(Instant::now));
    let now_ms = start.elapsed().as_millis() as u64;
    let next_xid = unsafe { pg_sys::ReadNextFullTransactionId() }.value;
    let own = crate::pg::xact::own_xids();
    let app = next_xid.saturating_sub(own);
    let (pace, share) = CONTROLLER.with(|c| {
        let mut c = c.borrow_mut();
        let ctl = c.get_or_insert_with(|| ShareController::new(target));
        ctl.set_target(target);
        let p = ctl.next(now_ms, app);
        (p, ctl.last_share)
    });
    match pace {
        Pace::Rest { ms } => {
            // the rest window is the measurement, not a throttle: what
            // throttled_by said stays
            Throttle::Wait(Duration::from_millis(ms))
        }
        Pace::Work { ratio } => {
            if ratio > 0.0 {
                set_throttled_by(
                    job_id,
                    Some(format!(
                        "application share: the application's write throughput with the rotation running was {:.0}% of what it is without (ekm.rotation_target_app_share = {:.2}): pausing {:.1} times each batch's time after it",
                        100.0 * share.unwrap_or(0.0),
                        target,
                        ratio
                    )),
                );
            } else {
                set_throttled_by(job_id, None);
            }
            Throttle::Go(ratio)
        }
    }
}

/// The replica lag and active sessions limits: what exceeds one, if any.
fn hard_limit(max_lag: i32, max_active: i32) -> Result<Option<String>, String> {
    if max_lag > 0 {
        let lag = Spi::connect(|c| -> pgrx::spi::SpiResult<Option<(String, f64)>> {
            let t = c.select(
                "SELECT coalesce(application_name, client_addr::text, pid::text), \
                        (extract(epoch FROM replay_lag) * 1000)::float8 \
                 FROM pg_catalog.pg_stat_replication WHERE replay_lag IS NOT NULL \
                 ORDER BY replay_lag DESC LIMIT 1",
                Some(1),
                &[],
            )?;
            if t.is_empty() {
                return Ok(None);
            }
            let r = t.first();
            Ok(Some((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<f64>(2)?.unwrap_or(0.0),
            )))
        })
        .map_err(|e| e.to_string())?;
        if let Some((standby, ms)) = lag.filter(|(_, ms)| *ms > max_lag as f64) {
            return Ok(Some(format!(
                "replica lag: standby {} replays {:.0} ms behind (ekm.rotation_max_replica_lag = {max_lag} ms)",
                crate::pg::owner::quote_literal(&standby),
                ms
            )));
        }
    }
    if max_active > 0 {
        // sessions waiting in ekm_rotation_wait (an extension wait event)
        // are not load
        let active = one_i64(
            "SELECT count(*) FROM pg_catalog.pg_stat_activity \
             WHERE state = 'active' AND backend_type = 'client backend' AND pid <> pg_catalog.pg_backend_pid() \
               AND wait_event_type IS DISTINCT FROM 'Extension'",
            vec![],
        )?;
        if active > max_active as i64 {
            return Ok(Some(format!(
                "active sessions: {active} client sessions are running a statement (ekm.rotation_max_active_sessions = {max_active})"
            )));
        }
    }
    Ok(None)
}

/// Writes `throttled_by` when what it says changes; `throttled_since` moves
/// only when the kind of throttle (the words before the first ':') changes.
fn set_throttled_by(job_id: i64, why: Option<String>) {
    let same = THROTTLED_BY.with(|t| *t.borrow() == why);
    if same {
        return;
    }
    let kind = |s: &Option<String>| {
        s.as_ref()
            .map(|s| s.split(':').next().unwrap_or("").to_string())
    };
    let prev_kind = THROTTLED_BY.with(|t| kind(&t.borrow()));
    let new_kind = kind(&why);
    let r = transaction(|| {
        spi::exec(
            "UPDATE ekm.rotation_job SET throttled_by = $2, \
                    throttled_since = CASE WHEN $2 IS NULL THEN NULL WHEN $3 AND throttled_since IS NOT NULL THEN throttled_since ELSE now() END \
             WHERE job_id = $1 AND state = 'running'",
            vec![job_id.into(), why.clone().into(), (prev_kind == new_kind).into()],
        )
        .map_err(|e| e.to_string())
    });
    if r.is_ok() {
        if let Some(w) = &why {
            if prev_kind != new_kind {
                pgrx::log!("ekm: rotation job {job_id}: throttled: {w}");
            }
        }
        THROTTLED_BY.with(|t| *t.borrow_mut() = why);
    }
}
