//! The rotation protocol (docs/design.md, section 5), one named function per
//! step. The worker (worker.rs) calls [`step`] in a transaction of its own,
//! again and again; `step` reads where the job stands and runs the one step
//! that comes next:
//!
//! ```text
//! a cursor group is scanning  -> run_batch (pass)      | end_pass at the pass's end
//! a cursor group is sweeping  -> sweep (encrypt jobs)
//! every cursor is done        -> settle:
//!     cover_new_registrations (partitions, columns registered since)
//!     no fence yet            -> check (#1): values left? another pass;
//!                                 only stuck values? needs_attention;
//!                                 clean? take_fence
//!     a fence                 -> fence_cleared? else wait (Later)
//!                                 final_step: under the key-change lock,
//!                                 check (#2), then retire exactly the keys
//!                                 checked, if the job still runs
//! ```
//!
//! Longer than the other files, it is one cohesive thing: the step machine
//! itself. Its steps share the job's cached cursor group and fence (this
//! backend's memory between transactions) and the pause points the tests
//! hold it at; the design's invariants are stated over the whole of it.
//! What it uses (starting jobs, scans, the batch functions, ekm's locks) is
//! in the files beside it and below it.

use crate::jobs::notify::notify;
use crate::keys::catalog;
use crate::keys::locks::EkmLock;
use crate::pg::owner;
use crate::pg::spi::{self, err_text as spi_err, kept, one_i64, set_local, INT8};
use pgrx::prelude::*;
use pgrx::PgOid;

/// What the worker does after a step.
pub(crate) enum Step {
    /// Made progress; go on at once (after the throttle pause).
    Again,
    /// Nothing to do right now (rows locked, old transactions); retry later.
    Later,
    /// Every table left is another worker's (ekm.rotation_workers): look
    /// again shortly.
    Soon,
    /// On a Citus coordinator: worker nodes are not verified yet; ask them
    /// again after a short pause (helpers::NODES).
    Nodes,
    /// Job finished, cancelled, failed, needs attention, or gone.
    Stop,
}

/// A batch found the job or its cursors changed under it: rolled back, redone
/// after re-reading them.
pub(crate) const STALE_GROUP: &str = "ekm: the job or its cursors changed; batch redone";

/// Advisory lock class of the pause points (`ekm.debug_pause_points`):
/// 'ekmp'. The object id is the point's index in [`PAUSE_POINTS`] + 1.
pub(crate) const PAUSE_CLASS: i32 = 0x656b_6d70;

/// Named steps where the worker can be held by a test (docs/design.md).
pub(crate) const PAUSE_POINTS: [&str; 6] = [
    "batch",       // 1: before each batch
    "pass_end",    // 2: when a cursor reaches the end of its pass
    "check",       // 3: before the check that decides whether to take the fence
    "fence",       // 4: right after the fence was taken
    "final_check", // 5: in the final step, holding the key-change lock, before its check
    "retire",      // 6: in the final step, after a clean check, before retiring
];

thread_local! {
    /// The batch statement of the table being worked on, prepared once
    /// (SPI_keepplan) and reused by every batch: (statement text, plan).
    static BATCH_PLAN: std::cell::RefCell<Option<(String, pgrx::spi::OwnedPreparedStatement)>> =
        const { std::cell::RefCell::new(None) };
    /// Set after a batch hit an application's row lock: the next batch skips
    /// locked rows (they are retried by the next pass) instead of waiting.
    pub(crate) static SKIP_LOCKED_NEXT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The job's kind and the group the last batch worked on, at its new
    /// position: the next batch starts from it without re-reading the job
    /// (its bookkeeping statement checks that the job still runs and the
    /// cursors still stand there, else the batch is rolled back and redone).
    static GROUP: std::cell::RefCell<Option<(String, Group)>> = const { std::cell::RefCell::new(None) };
    /// The fence, taken after a clean check; dropped when anything sends a
    /// column back for another pass, adds a cursor, or changes the keys.
    static FENCE: std::cell::RefCell<Option<Fence>> = const { std::cell::RefCell::new(None) };
    /// What this worker has claimed (ekm's claim lock, session-scoped): a
    /// table's cursor group (and whether for a scan), or a block range of
    /// one (ekm.rotation_range).
    static CLAIMED: std::cell::Cell<Option<EkmLock>> = const { std::cell::Cell::new(None) };
    /// When this worker last picked a group: how many other tables had
    /// cursors left (the job's worker starts helpers for them).
    static OTHERS_LEFT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Claims a table's cursor group or a block range of one for this worker
/// (giving back what it had), unless another worker has it. A claim is
/// held across the batches and given back when the worker picks its next
/// group (after the step that ended the pass or the range committed), when
/// the table is dropped, or when the worker exits.
fn claim(lock: EkmLock) -> bool {
    if CLAIMED.with(|c| c.get()) == Some(lock) {
        return true;
    }
    release_claim();
    let ok = crate::keys::locks::try_lock_session(lock);
    if ok {
        CLAIMED.with(|c| c.set(Some(lock)));
    }
    ok
}

/// Gives back this worker's claim, if it holds one.
pub(crate) fn release_claim() {
    if let Some(lock) = CLAIMED.with(|c| c.take()) {
        crate::keys::locks::unlock_session(lock);
    }
}

/// How many other tables had cursors left when this worker last picked a
/// group (once; None if it did not pick one since).
pub(crate) fn take_others_left() -> Option<usize> {
    OTHERS_LEFT.with(|c| c.take())
}

fn set_fence(f: Option<Fence>) {
    FENCE.with(|c| *c.borrow_mut() = f);
}

/// What the final step waits for before its check: the transactions that
/// were running when the fence was taken (virtual transaction ids), then the
/// prepared transactions there were once those had ended, then every
/// snapshot older than the fence (an imported one, say). And the keys the
/// clean check saw rotating: exactly those are retired.
struct Fence {
    keys: Vec<String>,
    vxids: Vec<String>,
    /// the oldest transaction id running (in any database) when the fence
    /// was taken: a snapshot with an older xmin was taken before the fence
    xmin: String,
    gids: Option<Vec<String>>,
}

/// The first unfinished cursor group of a job: every column of one table at
/// the same position.
#[derive(Clone)]
struct Group {
    tbl: pg_sys::Oid,
    /// the table's current name and owner, looked up at every batch
    table: Option<owner::Table>,
    state: String,
    next_block: i64,
    blocks_per_batch: i32,
    /// where this pass ends: the table's size when the pass began (or now,
    /// if it shrank)
    nblocks: i64,
    /// where this worker's part of the pass ends: `nblocks`, or less once
    /// other workers took block ranges of it (ekm.rotation_range)
    end: i64,
    /// the block range this group is (None: the cursors' own part)
    range: Option<u16>,
    /// the cursors' part: where it ends once ranges were split off this
    /// pass (rotation_cursor.pass_end), and how many of them are left
    pass_end: Option<i64>,
    ranges_left: i64,
    /// quoted identifiers, names, contexts (same order)
    quoted: Vec<String>,
    names: Vec<String>,
    contexts: Vec<String>,
}

fn e(err: ekm_core::EkmError) -> String {
    err.to_string()
}

/// One step of job `job_id` (see the module's documentation). A `helper`
/// (ekm.rotation_workers) runs only the steps of cursor groups: batches,
/// ends of passes, sweeps; it stops when no table is left for it, and the
/// job's own worker alone settles (checks, fence, final step).
pub(crate) fn step(job_id: i64, helper: bool) -> Result<Step, String> {
    set_batch_timeouts();
    let cached = GROUP.with(|c| c.borrow_mut().take());
    let (kind, group) = match cached {
        Some((kind, g)) => (kind, Some(g)),
        None => match next_group(job_id)? {
            Some((kind, Head::Group(g))) => (kind, Some(g)),
            Some((kind, Head::AllDone)) => (kind, None),
            Some((_, Head::Busy)) if helper => return Ok(Step::Stop),
            Some((_, Head::Busy)) => return Ok(Step::Soon),
            // (a block range was split off for this worker: its batches
            // begin in the next step, the split committed)
            Some((_, Head::Split)) => return Ok(Step::Again),
            None => return Ok(Step::Stop),
        },
    };
    if helper && group.is_none() {
        return Ok(Step::Stop);
    }
    if !helper {
        // on a Citus coordinator: the worker nodes' parts start now
        crate::jobs::cluster::start_nodes_once(job_id, &kind)?;
    }
    match group {
        Some(mut g) => {
            set_fence(None);
            // the table's current name and owner (the group may be cached
            // from an earlier batch, and a table can be renamed or change
            // hands between batches)
            let Some(table) = owner::Table::lookup(g.tbl) else {
                return dropped_table(job_id, &kind, g.tbl);
            };
            // a scan reads materialized views too; the other jobs only tables
            if kind != "scan" && !table.is_table() {
                return Err(e(owner::Table::require(g.tbl).expect_err("not a table")));
            }
            g.table = Some(table);
            if g.state != "scanning" {
                sweep(job_id, g)
            } else if g.next_block >= g.end {
                match g.range {
                    Some(seq) => end_range(job_id, &g, seq),
                    // the ranges split off this pass are not all done
                    None if g.ranges_left > 0 => Ok(if helper { Step::Stop } else { Step::Soon }),
                    None => end_pass(job_id, &kind, g),
                }
            } else if kind == "scan" {
                scan_batch(job_id, kind, g)
            } else {
                run_batch(job_id, kind, g)
            }
        }
        None if kind == "encrypt" || kind == "scan" => finish(job_id, &kind, &[]),
        None => settle(job_id, &kind),
    }
}

/// The table of a cursor group was dropped during the job. Its values went
/// with it: its cursors are removed (and, for a partition, its registration
/// goes at the next sync). A table registered by itself stays registered,
/// and the check refuses to retire until it is unregistered (it cannot
/// count values in a table that is not there).
fn dropped_table(job_id: i64, kind: &str, tbl: pg_sys::Oid) -> Result<Step, String> {
    release_claim();
    spi::exec(
        "DELETE FROM ekm.rotation_cursor WHERE job_id = $1 AND tbl = $2::oid",
        vec![job_id.into(), tbl.into()],
    )
    .map_err(e)?;
    spi::exec(
        "DELETE FROM ekm.rotation_range WHERE job_id = $1 AND tbl = $2::oid",
        vec![job_id.into(), tbl.into()],
    )
    .map_err(e)?;
    pgrx::log!(
        "ekm: {kind} job {job_id}: the table with OID {} was dropped during the job; its cursors are removed",
        tbl.to_u32()
    );
    Ok(Step::Again)
}

/// lock_timeout and deadlock_timeout of every step's transaction.
fn set_batch_timeouts() {
    // Below deadlock_timeout: in a lock cycle with an application
    // transaction, the batch gives up before the application's deadlock
    // check could abort the application's transaction.
    let lock_timeout_ms = crate::pg::gucs::rotation_lock_timeout_ms()
        .min(server_deadlock_timeout_ms() / 2)
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
}

/// The server's deadlock_timeout (its reset value: a step may already have
/// set its own, locally, earlier in the same transaction).
fn server_deadlock_timeout_ms() -> i32 {
    let v = unsafe { pg_sys::GetConfigOptionResetString(c"deadlock_timeout".as_ptr()) };
    if v.is_null() {
        return unsafe { pg_sys::DeadlockTimeout };
    }
    unsafe { std::ffi::CStr::from_ptr(v) }
        .to_str()
        .ok()
        .and_then(|s| s.parse::<i32>().ok())
        .unwrap_or(unsafe { pg_sys::DeadlockTimeout })
}

/// With `ekm.debug_pause_points` on, waits while a session holds the
/// advisory lock of pause point `name` (tests hold the worker at a named
/// protocol step this way; docs/design.md). Off by default: a no-op.
fn pause_point(name: &str) -> Result<(), String> {
    if !crate::pg::gucs::debug_pause_points() {
        return Ok(());
    }
    let id = PAUSE_POINTS
        .iter()
        .position(|p| *p == name)
        .expect("a pause point") as i32
        + 1;
    // the wait must not time out like a batch's lock wait
    set_local("lock_timeout", "0");
    let r = Spi::run_with_args(
        "SELECT pg_catalog.pg_advisory_xact_lock_shared($1, $2)",
        &[PAUSE_CLASS.into(), id.into()],
    )
    .map_err(spi_err);
    set_batch_timeouts();
    r
}

/// The job's kind (None if it no longer runs) and its first unfinished
/// cursor group, with where the group's pass ends, in one statement.
/// What a worker works on next.
enum Head {
    /// a cursor group of a table this worker has claimed
    Group(Group),
    /// every cursor is done: settle (or finish)
    AllDone,
    /// cursors are left, each on a table another worker has claimed
    Busy,
    /// this worker split a block range off another worker's part of a
    /// pass, and claimed it
    Split,
}

/// The job's kind and what this worker works on next, or None if the job
/// is not running: the first table with cursors left that no other worker
/// has claimed; else a block range no worker has (one whose worker
/// exited); else a range split off the largest part of a pass another
/// worker is on (ekm.rotation_workers; not for scans of the database).
fn next_group(job_id: i64) -> Result<Option<(String, Head)>, String> {
    let Some((kind, tables)) = kept(
        "SELECT j.kind, coalesce(array_agg(DISTINCT c.tbl::oid::int8) FILTER (WHERE c.state <> 'done'), '{}') \
         FROM ekm.rotation_job j LEFT JOIN ekm.rotation_cursor c ON c.job_id = j.job_id \
         WHERE j.job_id = $1 AND j.state = 'running' GROUP BY j.kind",
        &[INT8],
        false,
        &[job_id.into()],
        |t| -> pgrx::spi::SpiResult<Option<(String, Vec<i64>)>> {
            if t.is_empty() {
                return Ok(None);
            }
            let r = t.first();
            Ok(Some((r.get::<String>(1)?.unwrap_or_default(), r.get::<Vec<i64>>(2)?.unwrap_or_default())))
        },
    )?
    else {
        return Ok(None);
    };
    if tables.is_empty() {
        release_claim();
        return Ok(Some((kind, Head::AllDone)));
    }
    let scan = kind == "scan";
    // the block range this worker was on, while it lasts
    if let Some(EkmLock::Range(t, seq)) = CLAIMED.with(|c| c.get()) {
        if let Some(g) = range_group(job_id, t, seq)? {
            note_others(tables.len() - 1, &g, scan);
            return Ok(Some((kind, Head::Group(g))));
        }
        release_claim();
    }
    // the table this worker had first (its claim), then the others in order
    let mine = match CLAIMED.with(|c| c.get()) {
        Some(EkmLock::Claim(t, _)) => Some(t.to_u32() as i64),
        _ => None,
    };
    let mut order = tables.clone();
    order.sort_by_key(|t| (Some(*t) != mine, *t));
    for t in order {
        let tbl = pg_sys::Oid::from(t as u32);
        if !claim(EkmLock::Claim(tbl, scan)) {
            continue;
        }
        match group_of(job_id, tbl)? {
            // its own part of the pass is done, the ranges split off it are
            // other workers' (the pass ends when they are done)
            Some((_, Some(g))) if g.next_block >= g.end && g.ranges_left > 0 => release_claim(),
            Some((_, Some(g))) => {
                note_others(tables.len() - 1, &g, scan);
                return Ok(Some((kind, Head::Group(g))));
            }
            // done meanwhile
            _ => release_claim(),
        }
    }
    if !scan {
        if let Some(g) = free_range(job_id)? {
            note_others(tables.len(), &g, scan);
            return Ok(Some((kind, Head::Group(g))));
        }
        if split(job_id, &tables)? {
            return Ok(Some((kind, Head::Split)));
        }
    }
    Ok(Some((kind, Head::Busy)))
}

/// What other workers could take beside group `g` this worker picked: the
/// `tables` left beside it, and, if `g` can be split, one block range of it
/// per other worker ekm.rotation_workers allows (the job's worker starts
/// helpers for them).
fn note_others(tables: usize, g: &Group, scan: bool) {
    let splittable = !scan
        && g.state == "scanning"
        && ekm_core::pace::split_point(g.next_block, g.end, g.blocks_per_batch as i64).is_some();
    let helpers = if splittable {
        crate::pg::gucs::rotation_workers().max(1) as usize - 1
    } else {
        0
    };
    OTHERS_LEFT.with(|c| c.set(Some(tables + helpers)));
}

/// The cursor group of table `tbl`: its columns that stand at the first
/// unfinished position.
fn group_of(job_id: i64, tbl: pg_sys::Oid) -> Result<Option<(String, Option<Group>)>, String> {
    kept(
        "SELECT j.kind, g.tbl, g.state, g.next_block, g.blocks_per_batch, g.nblocks, g.quoted, g.names, g.contexts, \
                g.pass_end, (SELECT count(*) FROM ekm.rotation_range r WHERE r.job_id = j.job_id AND r.tbl = g.tbl::pg_catalog.regclass) \
         FROM ekm.rotation_job j \
         LEFT JOIN LATERAL ( \
           SELECT f.tbl::oid AS tbl, f.state, f.next_block, f.blocks_per_batch, f.pass_end, \
                  least(pg_relation_size(f.tbl) / current_setting('block_size')::bigint, f.blocks_total) AS nblocks, \
                  array_agg(pg_catalog.quote_ident(c.col) ORDER BY c.col) AS quoted, array_agg(c.col::text ORDER BY c.col) AS names, \
                  array_agg(c.context ORDER BY c.col) AS contexts \
           FROM (SELECT tbl, state, next_block, blocks_per_batch, blocks_total, pass_end FROM ekm.rotation_cursor \
                 WHERE job_id = j.job_id AND tbl = $2::pg_catalog.oid AND state <> 'done' ORDER BY col LIMIT 1) f \
           JOIN ekm.rotation_cursor c ON c.job_id = j.job_id AND c.tbl = f.tbl AND c.state = f.state AND c.next_block = f.next_block \
           GROUP BY f.tbl, f.state, f.next_block, f.blocks_per_batch, f.blocks_total, f.pass_end) g ON true \
         WHERE j.job_id = $1 AND j.state = 'running'",
        &[INT8, pg_sys::OIDOID],
        false,
        &[job_id.into(), tbl.into()],
        |t| -> pgrx::spi::SpiResult<Option<(String, Option<Group>)>> {
            if t.is_empty() {
                return Ok(None);
            }
            let r = t.first();
            let kind = r.get::<String>(1)?.unwrap_or_default();
            let group = match r.get::<pg_sys::Oid>(2)? {
                None => None,
                Some(tbl) => {
                    let nblocks = r.get::<i64>(6)?.unwrap_or(0);
                    let pass_end = r.get::<i64>(10)?;
                    Some(Group {
                        tbl,
                        table: None, // looked up at every batch
                        state: r.get::<String>(3)?.unwrap_or_default(),
                        next_block: r.get::<i64>(4)?.unwrap_or(0),
                        blocks_per_batch: r.get::<i32>(5)?.unwrap_or(1),
                        nblocks,
                        end: pass_end.map_or(nblocks, |p| p.min(nblocks)),
                        range: None,
                        pass_end,
                        ranges_left: r.get::<i64>(11)?.unwrap_or(0),
                        quoted: r.get::<Vec<String>>(7)?.unwrap_or_default(),
                        names: r.get::<Vec<String>>(8)?.unwrap_or_default(),
                        contexts: r.get::<Vec<String>>(9)?.unwrap_or_default(),
                    })
                }
            };
            Ok(Some((kind, group)))
        },
    )
}

/// Block range `seq` of table `tbl` as a group (its columns' cursors give
/// the batch size and contexts), if it is left and the job runs.
fn range_group(job_id: i64, tbl: pg_sys::Oid, seq: u16) -> Result<Option<Group>, String> {
    kept(
        "SELECT r.next_block, r.hi, c.bpb, least(pg_relation_size(r.tbl) / current_setting('block_size')::bigint, c.blocks_total), \
                c.quoted, c.names, c.contexts \
         FROM ekm.rotation_job j JOIN ekm.rotation_range r ON r.job_id = j.job_id \
         CROSS JOIN LATERAL (SELECT min(x.blocks_per_batch) AS bpb, max(x.blocks_total) AS blocks_total, \
                                    array_agg(pg_catalog.quote_ident(x.col) ORDER BY x.col) AS quoted, \
                                    array_agg(x.col::text ORDER BY x.col) AS names, array_agg(x.context ORDER BY x.col) AS contexts \
                             FROM ekm.rotation_cursor x \
                             WHERE x.job_id = r.job_id AND x.tbl = r.tbl AND x.col = ANY (r.cols) AND x.state = 'scanning') c \
         WHERE j.job_id = $1 AND j.state = 'running' AND r.tbl = $2::pg_catalog.oid AND r.seq = $3 AND c.names IS NOT NULL",
        &[INT8, pg_sys::OIDOID, pg_sys::INT2OID],
        false,
        &[job_id.into(), tbl.into(), (seq as i16).into()],
        |t| -> pgrx::spi::SpiResult<Option<Group>> {
            if t.is_empty() {
                return Ok(None);
            }
            let r = t.first();
            let nblocks = r.get::<i64>(4)?.unwrap_or(0);
            Ok(Some(Group {
                tbl,
                table: None,
                state: "scanning".into(),
                next_block: r.get::<i64>(1)?.unwrap_or(0),
                blocks_per_batch: r.get::<i32>(3)?.unwrap_or(1),
                nblocks,
                end: r.get::<i64>(2)?.unwrap_or(0),
                range: Some(seq),
                pass_end: None,
                ranges_left: 0,
                quoted: r.get::<Vec<String>>(5)?.unwrap_or_default(),
                names: r.get::<Vec<String>>(6)?.unwrap_or_default(),
                contexts: r.get::<Vec<String>>(7)?.unwrap_or_default(),
            }))
        },
    )
}

/// The block ranges of a job, those with the most blocks left first.
fn ranges_of(job_id: i64) -> Result<Vec<(pg_sys::Oid, u16)>, String> {
    Spi::connect(|c| -> pgrx::spi::SpiResult<Vec<(pg_sys::Oid, u16)>> {
        let mut v = Vec::new();
        for r in c.select(
            "SELECT tbl::oid, seq FROM ekm.rotation_range WHERE job_id = $1 ORDER BY hi - next_block DESC, tbl, seq",
            None,
            &[job_id.into()],
        )? {
            v.push((r.get::<pg_sys::Oid>(1)?.unwrap_or_default(), r.get::<i16>(2)?.unwrap_or(0) as u16));
        }
        Ok(v)
    })
    .map_err(spi_err)
}

/// A block range of the job that no worker has (its worker exited, or
/// split it off and stopped), claimed: the largest first.
fn free_range(job_id: i64) -> Result<Option<Group>, String> {
    for (tbl, seq) in ranges_of(job_id)? {
        if !claim(EkmLock::Range(tbl, seq)) {
            continue;
        }
        if let Some(g) = range_group(job_id, tbl, seq)? {
            return Ok(Some(g));
        }
        release_claim();
    }
    Ok(None)
}

/// Splits the largest part of a pass that another worker is on (a cursor
/// group's own part or a block range; `tables`: those with cursors left)
/// at `ekm_core::pace::split_point`, and claims the upper half as a new
/// block range for this worker. Whether it did. The other worker's batch
/// in flight ends below the split point, and its next bookkeeping learns
/// the new end of its part (advance).
fn split(job_id: i64, tables: &[i64]) -> Result<bool, String> {
    let mut parts: Vec<Group> = Vec::new();
    for t in tables {
        if let Some((_, Some(g))) = group_of(job_id, pg_sys::Oid::from(*t as u32))? {
            if g.state == "scanning" {
                parts.push(g);
            }
        }
    }
    for (tbl, seq) in ranges_of(job_id)? {
        parts.extend(range_group(job_id, tbl, seq)?);
    }
    // the part with the most left that can be split
    let Some((g, at)) = parts
        .into_iter()
        .filter_map(|g| {
            ekm_core::pace::split_point(g.next_block, g.end, g.blocks_per_batch as i64)
                .map(|at| (g, at))
        })
        .max_by_key(|(g, _)| g.end - g.next_block)
    else {
        return Ok(false);
    };
    let (tbl, bpb) = (g.tbl, g.blocks_per_batch as i64);
    // a free range number whose claim this worker gets
    let taken: Vec<u16> = ranges_of(job_id)?
        .into_iter()
        .filter(|(t, _)| *t == tbl)
        .map(|(_, s)| s)
        .collect();
    let Some(seq) = (0..crate::keys::locks::MAX_RANGES)
        .filter(|s| !taken.contains(s))
        .take(16)
        .find(|s| claim(EkmLock::Range(tbl, *s)))
    else {
        return Ok(false);
    };
    // The other worker's part now ends at the split point, if it is still
    // at least two batches short of it and nobody split it meanwhile (the
    // row versions this reads are the newest: READ COMMITTED re-checks a
    // row another transaction updated).
    let (cut, expected) = match g.range {
        None => (
            kept(
                "UPDATE ekm.rotation_cursor SET pass_end = $4 \
                 WHERE job_id = $1 AND tbl = $2::pg_catalog.oid AND col = ANY ($3::name[]) AND state = 'scanning' \
                   AND next_block + 2 * $5 <= $4 AND pass_end IS NOT DISTINCT FROM $6",
                &[INT8, pg_sys::OIDOID, pg_sys::TEXTARRAYOID, INT8, INT8, INT8],
                true,
                &[job_id.into(), tbl.into(), g.names.clone().into(), at.into(), bpb.into(), g.pass_end.into()],
                |t| Ok(t.len()),
            )?,
            g.names.len(),
        ),
        Some(r) => (
            kept(
                "UPDATE ekm.rotation_range SET hi = $4 \
                 WHERE job_id = $1 AND tbl = $2::pg_catalog.oid AND seq = $3 AND next_block + 2 * $5 <= $4 AND hi = $6",
                &[INT8, pg_sys::OIDOID, pg_sys::INT2OID, INT8, INT8, INT8],
                true,
                &[job_id.into(), tbl.into(), (r as i16).into(), at.into(), bpb.into(), g.end.into()],
                |t| Ok(t.len()),
            )?,
            1,
        ),
    };
    if cut != expected {
        // it moved on or was split meanwhile: this step is rolled back
        release_claim();
        return Err(STALE_GROUP.to_string());
    }
    spi::exec(
        "INSERT INTO ekm.rotation_range (job_id, tbl, seq, cols, next_block, hi) VALUES ($1, $2::pg_catalog.oid, $3, $4::name[], $5, $6)",
        vec![job_id.into(), tbl.into(), (seq as i16).into(), g.names.into(), at.into(), g.end.into()],
    )
    .map_err(e)?;
    Ok(true)
}

/// What a job's batches move: the per-row predicate and the function that
/// returns each value moved (or unchanged).
fn mover(kind: &str) -> (&'static str, &'static str) {
    if kind == "encrypt" {
        ("pg_temp._ekm_is_plaintext", "pg_temp._ekm_encrypt_plain")
    } else {
        ("pg_temp._ekm_on_rotating_key", "pg_temp._ekm_rotate_value")
    }
}

/// Step: one batch of a pass. One UPDATE of the group's table over a TID
/// range, as the table's owner (security-restricted), all its columns at
/// once; then the job's count and the cursors move in the same transaction.
fn run_batch(job_id: i64, kind: String, g: Group) -> Result<Step, String> {
    pause_point("batch")?;
    let table = g.table.as_ref().expect("looked up by step");
    let (pred, func) = mover(&kind);
    let any = |prefix: &str| {
        g.quoted
            .iter()
            .map(|q| format!("{pred}({prefix}{q})"))
            .collect::<Vec<_>>()
            .join(" OR ")
    };
    // (smaller than the job's batch size in a small table, for the vacuum
    // behind the batches to bound its growth: pace.rs)
    let bpb = crate::jobs::pace::batch_blocks(g.blocks_per_batch as i64, g.nblocks);
    // (never past the end of this worker's part: beyond it is another's)
    let hi = (g.next_block + bpb).min(g.end);
    // Identifiers are quoted by PostgreSQL (quote_identifier), every
    // function and operator is qualified; values are bound. Each function
    // returns the value unchanged unless it moves it. ONLY: a partition or
    // inheritance child is a registered table of its own.
    // the batch's token (fastpath::BatchGate) is the last parameter
    let tok = g.contexts.len() + 3;
    let sets = g
        .quoted
        .iter()
        .enumerate()
        .map(|(i, q)| {
            format!(
                "{q} = {func}(t.{q}, ${}::pg_catalog.text, {i}, ${tok}::pg_catalog.int8)",
                i + 3
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let skip_locked = SKIP_LOCKED_NEXT.with(|s| s.replace(false));
    let sql = if skip_locked {
        // Rows an application holds are skipped, not waited for.
        format!(
            "WITH c AS (SELECT ctid FROM ONLY {t} WHERE ctid OPERATOR(pg_catalog.>=) $1::pg_catalog.tid \
                          AND ctid OPERATOR(pg_catalog.<) $2::pg_catalog.tid AND ({a}) FOR UPDATE SKIP LOCKED) \
             UPDATE ONLY {t} t SET {sets} FROM c WHERE t.ctid OPERATOR(pg_catalog.=) c.ctid",
            t = table.qualified,
            a = any(""),
        )
    } else {
        // A plain UPDATE: a row an application holds is waited for at most
        // lock_timeout, then the batch is retried skipping locked rows.
        format!(
            "UPDATE ONLY {t} t SET {sets} WHERE t.ctid OPERATOR(pg_catalog.>=) $1::pg_catalog.tid \
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
    // The application's code (triggers, defaults, constraints, index
    // expressions) runs with the search_path the owner logs in with, as it
    // does for the application; ekm's own SQL above is schema-qualified.
    let path = owner::batch_search_path(table.owner).map_err(e)?;
    crate::jobs::batchfn::reset_moved();
    let gate = crate::jobs::batchfn::BatchGate::open(&g.contexts);
    args.push(gate.token().to_string().into());
    {
        // As the table's owner, security-restricted: its triggers,
        // constraints and index expressions run as that owner.
        let _gate = gate;
        owner::as_table_owner_with_path(table.owner, &path, || {
            BATCH_PLAN.with(|p| -> pgrx::spi::SpiResult<()> {
                let mut p = p.borrow_mut();
                Spi::connect_mut(|c| {
                    if p.as_ref().map(|(s, _)| s != &sql).unwrap_or(true) {
                        let types = vec![PgOid::from(pg_sys::TEXTOID); args.len()];
                        *p = Some((sql.clone(), c.prepare_mut(sql.as_str(), &types)?.keep()));
                    }
                    c.update(&p.as_ref().expect("prepared").1, None, &args)?;
                    Ok(())
                })
            })
        })
        .map_err(spi_err)?;
    }
    let ns = crate::jobs::batchfn::moved(g.names.len());
    advance(job_id, kind, g, hi, ns)
}

/// The bookkeeping of a batch: the job's count and the group's cursors
/// move to `hi`, in the batch's transaction (see below), and the next batch
/// starts from the group without re-reading the job.
fn advance(job_id: i64, kind: String, g: Group, hi: i64, ns: Vec<i64>) -> Result<Step, String> {
    let total: i64 = ns.iter().sum();
    // Counts and cursors move with the batch, in its transaction, if the
    // job still runs (its row is updated first and stays locked until the
    // batch commits: a cancel waits for it) and its cursors still stand
    // where the batch began; else the batch is rolled back and redone after
    // a fresh read. One statement, on a generic plan (primary-key lookups
    // whatever the values): re-planning it for each batch cost more than
    // running it.
    set_local("plan_cache_mode", "force_generic_plan");
    // (what the statement returns: where this worker's part now ends,
    // another worker may have split a range off it)
    let (moved, end) = match g.range {
        None => kept(
            "WITH j AS (UPDATE ekm.rotation_job SET rows_done = rows_done + $7 \
                        WHERE job_id = $1 AND state = 'running' RETURNING 1) \
             UPDATE ekm.rotation_cursor \
             SET next_block = $4, rows_done = rows_done + ($5::bigint[])[array_position($3::name[], col)] \
             WHERE job_id = $1 AND tbl = $2 AND col = ANY($3::name[]) AND state = 'scanning' AND next_block = $6 \
               AND EXISTS (SELECT FROM j) \
             RETURNING pass_end",
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
            |t| rows_and_end(t, g.end),
        )?,
        // a block range: its own position, the cursors' counts
        Some(seq) => kept(
            "WITH j AS (UPDATE ekm.rotation_job SET rows_done = rows_done + $7 \
                        WHERE job_id = $1 AND state = 'running' RETURNING 1), \
                  r AS (UPDATE ekm.rotation_range SET next_block = $4 \
                        WHERE job_id = $1 AND tbl = $2 AND seq = $8 AND next_block = $6 AND EXISTS (SELECT FROM j) RETURNING hi) \
             UPDATE ekm.rotation_cursor \
             SET rows_done = rows_done + ($5::bigint[])[array_position($3::name[], col)] \
             WHERE job_id = $1 AND tbl = $2 AND col = ANY($3::name[]) AND state = 'scanning' AND EXISTS (SELECT FROM r) \
             RETURNING (SELECT hi FROM r)",
            &[INT8, pg_sys::OIDOID, pg_sys::TEXTARRAYOID, INT8, pg_sys::INT8ARRAYOID, INT8, INT8, pg_sys::INT2OID],
            true,
            &[
                job_id.into(),
                g.tbl.into(),
                g.names.clone().into(),
                hi.into(),
                ns.into(),
                g.next_block.into(),
                total.into(),
                (seq as i16).into(),
            ],
            |t| rows_and_end(t, g.end),
        )?,
    };
    if moved != g.names.len() {
        return Err(STALE_GROUP.to_string());
    }
    // the vacuum behind the batches (pace.rs): due after enough batches
    // that rewrote rows
    crate::jobs::pace::batch_done(g.tbl, g.nblocks, hi - g.next_block, total);
    if hi < end {
        // the end of the table is decided by a fresh read of its size
        let mut next = g;
        next.next_block = hi;
        next.end = end;
        GROUP.with(|c| *c.borrow_mut() = Some((kind, next)));
    }
    Ok(Step::Again)
}

/// A bookkeeping statement's answer: how many cursor rows it moved, and
/// where the batch's part of the pass ends now (`end`, or less if another
/// worker split a range off it: the smallest end the rows returned).
fn rows_and_end(t: pgrx::spi::SpiTupleTable<'_>, end: i64) -> pgrx::spi::SpiResult<(usize, i64)> {
    let (n, mut end) = (t.len(), end);
    for r in t {
        if let Some(p) = r.get::<i64>(1)? {
            end = end.min(p);
        }
    }
    Ok((n, end))
}

/// Step: one batch of a scan of the database (`ekm_scan_database`): the
/// keys of the ekm ciphertexts found in the group's columns over a TID
/// range, counted per column and key into ekm.ciphertext_scan. Read-only on
/// the table, as its owner (security-restricted).
fn scan_batch(job_id: i64, kind: String, g: Group) -> Result<Step, String> {
    pause_point("batch")?;
    let table = g.table.as_ref().expect("looked up by step");
    let hi = g.next_block + g.blocks_per_batch as i64;
    let values = g
        .quoted
        .iter()
        .enumerate()
        .map(|(i, q)| format!("({i}, t.{q}::pg_catalog.text)"))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "SELECT v.i, k.k, pg_catalog.count(*) FROM ONLY {t} t, LATERAL (VALUES {values}) v(i, val), \
                LATERAL pg_catalog.unnest(pg_temp._ekm_keys_in(v.val)) k(k) \
         WHERE t.ctid OPERATOR(pg_catalog.>=) $1::pg_catalog.tid AND t.ctid OPERATOR(pg_catalog.<) $2::pg_catalog.tid \
         GROUP BY 1, 2",
        t = table.qualified
    );
    let args: Vec<pgrx::datum::DatumWithOid<'_>> = vec![
        format!("({},0)", g.next_block).into(),
        format!("({hi},0)").into(),
    ];
    let found = {
        let _gate = crate::jobs::batchfn::BatchGate::open(&[]);
        table
            .as_owner(|| {
                Spi::connect(|c| -> pgrx::spi::SpiResult<Vec<(i32, String, i64)>> {
                    let mut v = Vec::new();
                    for r in c.select(sql.as_str(), None, &args)? {
                        v.push((
                            r.get::<i32>(1)?.unwrap_or(0),
                            r.get::<String>(2)?.unwrap_or_default(),
                            r.get::<i64>(3)?.unwrap_or(0),
                        ));
                    }
                    Ok(v)
                })
            })
            .map_err(spi_err)?
    };
    let mut ns = vec![0i64; g.names.len()];
    for (i, key, n) in found {
        let col = &g.names[i as usize];
        ns[i as usize] += n;
        spi::exec(
            "INSERT INTO ekm.ciphertext_scan AS s (job_id, tbl, col, key_id, values) VALUES ($1, $2::regclass, $3, $4, $5) \
             ON CONFLICT (job_id, tbl, col, key_id) DO UPDATE SET values = s.values + excluded.values, scanned_at = now()",
            vec![job_id.into(), g.tbl.into(), col.clone().into(), key.into(), n.into()],
        )
        .map_err(e)?;
    }
    advance(job_id, kind, g, hi, ns)
}

/// Step: a cursor group reached the end of its pass: the table's size when
/// the pass began (blocks_total). Beyond it are the row versions the
/// batches appended, already moved, and rows written since, which the check
/// (settle) scans for with the whole table, sending the column back for
/// another pass if one needs moving. A migration sweeps its column first.
fn end_pass(job_id: i64, kind: &str, g: Group) -> Result<Step, String> {
    pause_point("pass_end")?;
    // (the claim on the table is given back when this worker picks its next
    // group, after this step committed)
    // what the last batches of the pass left behind is vacuumed too
    crate::jobs::pace::pass_ended(g.tbl);
    spi::exec(
        if kind == "encrypt" {
            "UPDATE ekm.rotation_cursor SET state = 'sweeping', pass_end = NULL \
             WHERE job_id = $1 AND tbl = $2::regclass AND col = ANY($3::name[])"
        } else {
            "UPDATE ekm.rotation_cursor SET state = 'done', rows_total = rows_done, pass_end = NULL \
             WHERE job_id = $1 AND tbl = $2::regclass AND col = ANY($3::name[])"
        },
        vec![job_id.into(), g.tbl.into(), g.names.clone().into()],
    )
    .map_err(e)?;
    Ok(Step::Again)
}

/// Step: a block range reached its end: it goes (the claim on it is given
/// back when this worker picks its next group). The pass it belongs to ends
/// when its cursors' own part and every range are done (end_pass, by the
/// worker that then claims the table).
fn end_range(job_id: i64, g: &Group, seq: u16) -> Result<Step, String> {
    spi::exec(
        "DELETE FROM ekm.rotation_range WHERE job_id = $1 AND tbl = $2::pg_catalog.oid AND seq = $3",
        vec![job_id.into(), g.tbl.into(), (seq as i16).into()],
    )
    .map_err(e)?;
    Ok(Step::Again)
}

/// Step (column encryption): what plaintext is left in the group's columns,
/// in one scan: none, and the cursor is done; else another pass.
fn sweep(job_id: i64, g: Group) -> Result<Step, String> {
    let table = g.table.as_ref().expect("looked up by step");
    let left = count_values(table, &g.quoted, &[], "pg_temp._ekm_is_plaintext({c})")?;
    let done: Vec<String> = g
        .names
        .iter()
        .zip(&left)
        .filter(|(_, n)| **n == 0)
        .map(|(c, _)| c.clone())
        .collect();
    if !done.is_empty() {
        spi::exec(
            "UPDATE ekm.rotation_cursor SET state = 'done', rows_total = rows_done \
             WHERE job_id = $1 AND tbl = $2::regclass AND col = ANY($3::name[])",
            vec![job_id.into(), g.tbl.into(), done.into()],
        )
        .map_err(e)?;
    }
    Ok(if another_pass(job_id, g.tbl, &g.names, &left)? {
        Step::Later
    } else {
        Step::Again
    })
}

/// Every cursor is done: cover what was registered since, then check, fence,
/// and the final step.
fn settle(job_id: i64, kind: &str) -> Result<Step, String> {
    if cover_new_registrations(job_id)? > 0 {
        set_fence(None);
        return Ok(Step::Again);
    }
    let fence = FENCE.with(|f| f.borrow_mut().take());
    let Some(mut fence) = fence else {
        // On a Citus coordinator: every worker node's part is verified
        // first (section 9).
        if crate::jobs::cluster::coordinates(kind)?
            && !crate::jobs::cluster::nodes_ready(job_id, false, false)?
        {
            return Ok(Step::Nodes);
        }
        // Check #1: the fence is taken only once the registered columns
        // hold no movable value on a rotating key.
        pause_point("check")?;
        let keys = rotating_keys()?;
        return match check(job_id)? {
            Checked::Left => Ok(Step::Later),
            Checked::Stuck(n) => needs_attention(job_id, kind, n),
            Checked::Clean => {
                set_fence(Some(take_fence(keys)?));
                pause_point("fence")?;
                Ok(Step::Again)
            }
        };
    };
    if !fence_cleared(job_id, &mut fence)? {
        set_fence(Some(fence));
        return Ok(Step::Later);
    }
    // a worker node's part of a coordinator's job: the coordinator checks
    // again and retires (section 9)
    if crate::jobs::cluster::is_node_job(job_id)? {
        crate::jobs::cluster::verified(job_id)?;
        return Ok(Step::Stop);
    }
    final_step(job_id, kind, fence)
}

/// On a worker node, for the coordinator's final step: check #2 of this
/// node's verified job `job_id` (covering placements that arrived since).
/// Whether it is clean; if not, its columns went back for another pass, or
/// the job needs attention. (The session has the batch functions.)
pub(crate) fn node_final_check(job_id: i64, kind: &str) -> Result<bool, String> {
    if cover_new_registrations(job_id)? > 0 {
        return Ok(false);
    }
    match check(job_id)? {
        Checked::Clean => Ok(true),
        Checked::Left => Ok(false),
        Checked::Stuck(n) => needs_attention(job_id, kind, n).map(|_| false),
    }
}

/// Registers the partitions and inheritance children of registered tables
/// (attached or created since), forgets those that were dropped, and gives
/// every registered column of an ordinary table that has no cursor in this
/// job one. How many cursors it added.
pub(crate) fn cover_new_registrations(job_id: i64) -> Result<i64, String> {
    crate::jobs::start::sync_partitions().map_err(e)?;
    let batch_size = one_i64(
        "SELECT batch_size FROM ekm.rotation_job WHERE job_id = $1",
        vec![job_id.into()],
    )?;
    crate::jobs::start::add_cursors(job_id, batch_size as i32, None).map_err(e)
}

/// The keys that are rotating now (sorted).
fn rotating_keys() -> Result<Vec<String>, String> {
    Ok(spi::one::<Vec<String>>(
        "SELECT coalesce(array_agg(key_id ORDER BY key_id), '{}') FROM ekm.key WHERE rotation_status = 'rotating'",
        vec![],
    )
    .map_err(e)?
    .unwrap_or_default())
}

enum Checked {
    /// values to move were found: their columns went back for another pass
    Left,
    /// nothing movable is left, but this many values cannot be moved
    /// (recorded in ekm.rotation_problem)
    Stuck(i64),
    Clean,
}

/// Step: the check. One scan per registered table (ordinary tables only:
/// partitions are registered tables of their own), all its registered
/// columns at once, counting values on a rotating key that can be moved and
/// values that cannot (they do not decrypt with the column's context).
fn check(job_id: i64) -> Result<Checked, String> {
    let tables = Spi::connect(
        |c| -> pgrx::spi::SpiResult<Vec<(pg_sys::Oid, Vec<String>, Vec<String>, Vec<String>)>> {
            let mut v = Vec::new();
            for r in c.select(
                "SELECT r.tbl::oid, array_agg(pg_catalog.quote_ident(r.col) ORDER BY r.col), \
                    array_agg(r.col::text ORDER BY r.col), array_agg(r.context ORDER BY r.col) \
             FROM ekm.registered_column r JOIN pg_catalog.pg_class c ON c.oid = r.tbl \
             WHERE c.relkind = 'r' GROUP BY r.tbl ORDER BY 1",
                None,
                &[],
            )? {
                v.push((
                    r.get::<pg_sys::Oid>(1)?.unwrap_or_default(),
                    r.get::<Vec<String>>(2)?.unwrap_or_default(),
                    r.get::<Vec<String>>(3)?.unwrap_or_default(),
                    r.get::<Vec<String>>(4)?.unwrap_or_default(),
                ));
            }
            Ok(v)
        },
    )
    .map_err(spi_err)?;
    // a Citus table's rows are in its shard placements, registered and
    // checked on the nodes that hold them (section 9)
    let citus = crate::pg::citus::citus_tables().map_err(e)?;
    let tables: Vec<_> = tables
        .into_iter()
        .filter(|t| !citus.contains(&t.0))
        .collect();
    // what the problem list says is what this check finds
    spi::exec(
        "DELETE FROM ekm.rotation_problem_row WHERE job_id = $1",
        vec![job_id.into()],
    )
    .map_err(e)?;
    let mut left = false;
    let mut stuck = 0;
    for (tbl, quoted, names, contexts) in &tables {
        let t = owner::Table::require(*tbl).map_err(e)?;
        // The check must see every row (as_table_owner lifts row-level
        // security for the owner); if PostgreSQL ever filtered, refuse
        // rather than call hidden rows clean.
        if t.as_owner(|| owner::row_security_active(*tbl)).map_err(e)? {
            return Err(format!(
                "row-level security hides rows of {} from its owner, so ekm cannot check that every value moved; \
                 no key was retired (SELECT ekm_rotation_resume({job_id}) once the table's owner sees every row)",
                t.qualified
            ));
        }
        let movable = count_values(&t, quoted, contexts, "pg_temp._ekm_left({c}, {ctx}) = 1")?;
        if another_pass(job_id, *tbl, names, &movable)? {
            left = true;
            continue;
        }
        let bad = count_values(&t, quoted, contexts, "pg_temp._ekm_left({c}, {ctx}) = 2")?;
        for (i, n) in bad.iter().enumerate() {
            if *n > 0 {
                stuck += n;
                record_problems(job_id, &t, *tbl, &quoted[i], &names[i], &contexts[i])?;
            }
        }
    }
    Ok(if left {
        Checked::Left
    } else if stuck > 0 {
        Checked::Stuck(stuck)
    } else {
        Checked::Clean
    })
}

/// Records where the values of one column that cannot be moved are (the
/// primary key, else the ctid) and why, as the table's owner. At most 1000
/// rows per column and check.
fn record_problems(
    job_id: i64,
    t: &owner::Table,
    tbl: pg_sys::Oid,
    quoted: &str,
    name: &str,
    context: &str,
) -> Result<(), String> {
    let pk = spi::one::<String>(
        "SELECT string_agg(pg_catalog.quote_ident(a.attname), ', ' ORDER BY k.n) \
         FROM pg_catalog.pg_index i, unnest(i.indkey) WITH ORDINALITY k(attnum, n), pg_catalog.pg_attribute a \
         WHERE i.indrelid = $1 AND i.indisprimary AND a.attrelid = i.indrelid AND a.attnum = k.attnum",
        vec![tbl.into()],
    )
    .map_err(e)?;
    let row_ref = match &pk {
        Some(cols) => format!(
            "'(' || {} || ')=(' || pg_catalog.concat_ws(', ', {cols}) || ')'",
            owner::quote_literal(cols)
        ),
        None => "'ctid ' || ctid::pg_catalog.text".to_string(),
    };
    let sql = format!(
        "SELECT {row_ref}, {quoted}::pg_catalog.text FROM ONLY {} WHERE pg_temp._ekm_left({quoted}, $1::pg_catalog.text) = 2 LIMIT 1000",
        t.qualified
    );
    let _gate = crate::jobs::batchfn::BatchGate::open(&[context.to_string()]);
    let rows = t
        .as_owner(|| {
            Spi::connect(|c| -> pgrx::spi::SpiResult<Vec<(String, String)>> {
                let mut v = Vec::new();
                for r in c.select(&sql, None, &[context.into()])? {
                    v.push((
                        r.get::<String>(1)?.unwrap_or_default(),
                        r.get::<String>(2)?.unwrap_or_default(),
                    ));
                }
                Ok(v)
            })
        })
        .map_err(spi_err)?;
    for (row_ref, value) in rows {
        let (key, reason) = crate::jobs::scan::why_stuck(&value, context);
        spi::exec(
            "INSERT INTO ekm.rotation_problem_row (job_id, tbl, col, row_ref, key_id, reason) \
             VALUES ($1, $2::regclass, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            vec![
                job_id.into(),
                tbl.into(),
                name.into(),
                row_ref.into(),
                key.into(),
                reason.into(),
            ],
        )
        .map_err(e)?;
    }
    Ok(())
}

/// Step: the passes are over and nothing movable is left, but `n` values
/// cannot be moved: the job ends `needs_attention`, the rotating keys stay
/// rotating (every value still decrypts), and ekm.rotation_problem says
/// where. `ekm_rotation_resume` tries again once they are fixed.
fn needs_attention(job_id: i64, kind: &str, n: i64) -> Result<Step, String> {
    Spi::run("SET LOCAL synchronous_commit = on").map_err(spi_err)?;
    let msg = format!(
        "{n} values could not be moved (they do not decrypt with their column's context): see ekm.rotation_problem; fix them, then SELECT ekm_rotation_resume({job_id})"
    );
    let updated = one_i64(
        "WITH u AS (UPDATE ekm.rotation_job SET state = 'needs_attention', error = $2, waiting_for = NULL, finished_at = clock_timestamp() \
                    WHERE job_id = $1 AND state = 'running' RETURNING 1) SELECT count(*) FROM u",
        vec![job_id.into(), msg.clone().into()],
    )?;
    if updated == 0 {
        return Ok(Step::Stop);
    }
    catalog::audit(
        "rotation_needs_attention",
        None,
        &catalog::json_object(&[
            ("job_id", &job_id.to_string()),
            ("kind", kind),
            ("values", &n.to_string()),
        ]),
    )
    .map_err(e)?;
    notify(job_id, kind, "needs_attention")?;
    pgrx::warning!("ekm: {kind} job {job_id} needs attention: {msg}");
    Ok(Step::Stop)
}

/// Step: the fence. Taken right after a clean check: the transactions in
/// progress now (each holds the lock on its own virtual transaction id until
/// it ends) and the first transaction id not yet assigned. Some began before
/// the key switch and may still encrypt with the old key; any of them may
/// have copied a value on the old key (read before its row moved: INSERT ...
/// SELECT, an update from another row) and not committed it yet, invisible
/// to the check. Not waited for: autovacuum (it writes no values) and
/// sessions waiting in ekm_rotation_wait without an xid (their transaction
/// cannot commit a write: shmem::register_waiter).
fn take_fence(keys: Vec<String>) -> Result<Fence, String> {
    let vxids = spi::one::<Vec<String>>(
        "SELECT coalesce(array_agg(l.virtualxid), '{}') FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'virtualxid' AND l.virtualxid = l.virtualtransaction \
           AND a.datid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND a.pid <> pg_backend_pid() AND a.backend_type <> 'autovacuum worker'",
        vec![],
    )
    .map_err(e)?
    .unwrap_or_default();
    // The xmin of a snapshot is the oldest transaction running anywhere when
    // it was taken, and that only moves forward: a snapshot older than this
    // one can only have been taken before the fence (e.g. imported since).
    let xmin = spi::one::<String>(
        "SELECT pg_snapshot_xmin(pg_current_snapshot())::text",
        vec![],
    )
    .map_err(e)?
    .unwrap_or_default();
    Ok(Fence {
        keys,
        vxids,
        xmin,
        gids: None,
    })
}

/// Step: waiting out the fence, in three parts. (1) The transactions in it,
/// but sessions waiting in ekm_rotation_wait without an xid. (2) Then the
/// prepared transactions there are now: some may have been prepared by
/// them. (3) Then every session of the database whose snapshot is older
/// than the fence (its xmin precedes the oldest transaction that was running
/// when the fence was taken; a transaction in another database does not
/// hold this up): it
/// may still read, and copy, values the passes have moved since (an
/// imported snapshot, say); the waiters again excepted. What it waits for is
/// in rotation_job.waiting_for.
fn fence_cleared(job_id: i64, f: &mut Fence) -> Result<bool, String> {
    let waiters = crate::keys::shmem::waiters();
    let (old, pids) = spi::two::<i64, String>(
        "SELECT count(*), coalesce(string_agg(l.pid::text, ', ' ORDER BY l.pid), '') FROM pg_locks l \
         WHERE l.locktype = 'virtualxid' AND l.virtualxid = l.virtualtransaction AND l.virtualxid = ANY($1) \
           AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = l.pid AND a.pid = ANY($2) AND a.backend_xid IS NULL)",
        vec![f.vxids.clone().into(), waiters.clone().into()],
    )
    .map_err(e)?;
    let (old, pids) = (old.unwrap_or(0), pids.unwrap_or_default());
    let mut waiting = Vec::new();
    if old > 0 {
        waiting.push(format!(
            "{old} transactions that were running when the last pass ended (pids {pids})"
        ));
    } else {
        if f.gids.is_none() {
            f.gids = Some(
                spi::one::<Vec<String>>(
                    "SELECT coalesce(array_agg(gid), '{}') FROM pg_prepared_xacts WHERE database = current_database()",
                    vec![],
                )
                .map_err(e)?
                .unwrap_or_default(),
            );
        }
        let (prepared, gids) = spi::two::<i64, String>(
            "SELECT count(*), coalesce(string_agg(pg_catalog.quote_literal(gid), ', ' ORDER BY gid), '') FROM pg_prepared_xacts \
             WHERE database = current_database() AND gid = ANY($1)",
            vec![f.gids.clone().unwrap_or_default().into()],
        )
        .map_err(e)?;
        if prepared.unwrap_or(0) > 0 {
            waiting.push(format!(
                "{} prepared transactions (gids {}; COMMIT PREPARED or ROLLBACK PREPARED them)",
                prepared.unwrap_or(0),
                gids.unwrap_or_default()
            ));
        } else {
            let (old_snapshots, pids) = spi::two::<i64, String>(
                "SELECT count(*), coalesce(string_agg(a.pid::text, ', ' ORDER BY a.pid), '') FROM pg_stat_activity a \
                 WHERE a.datid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                   AND a.pid <> pg_backend_pid() AND a.backend_type <> 'autovacuum worker' \
                   AND a.backend_xmin IS NOT NULL AND NOT (a.pid = ANY($2) AND a.backend_xid IS NULL) \
                   AND age(a.backend_xmin) > age(xid($1::xid8))",
                vec![f.xmin.clone().into(), waiters.into()],
            )
            .map_err(e)?;
            if old_snapshots.unwrap_or(0) > 0 {
                waiting.push(format!(
                    "{} sessions holding a snapshot from before the last pass ended (pids {})",
                    old_snapshots.unwrap_or(0),
                    pids.unwrap_or_default()
                ));
            }
        }
    }
    if !waiting.is_empty() {
        set_waiting_for(
            job_id,
            Some(format!(
                "{}: they may still write values on the old key; the job retires it when they end",
                waiting.join(" and ")
            )),
        )?;
        return Ok(false);
    }
    Ok(true)
}

fn set_waiting_for(job_id: i64, what: Option<String>) -> Result<(), String> {
    spi::exec(
        "UPDATE ekm.rotation_job SET waiting_for = $2 WHERE job_id = $1 AND waiting_for IS DISTINCT FROM $2",
        vec![job_id.into(), what.into()],
    )
    .map(|_| ())
    .map_err(e)
}

/// Step: the final step, one transaction holding the lock every key and
/// registration change takes (ekm_activate_key, ekm_register_column,
/// ekm_rotate, ekm_rollback, ekm_rotation_cancel, ekm_cleanup_old_keys, ...):
/// nothing changes the keys, the registrations or the job between the check
/// and the retire. If the keys rotating now are not those the first check
/// saw, or something was registered since, it starts over (another check,
/// a new fence). Then check #2; if clean, exactly the keys checked are
/// retired, and the job is done only if it is still running.
fn final_step(job_id: i64, kind: &str, fence: Fence) -> Result<Step, String> {
    if !crate::keys::locks::try_lock_xact(crate::keys::locks::EkmLock::KeyChange) {
        let holder =
            crate::keys::locks::holders(crate::keys::locks::EkmLock::KeyChange).map_err(e)?;
        set_waiting_for(
            job_id,
            Some(format!(
                "a key or registration change in progress ({holder}) to finish before the final check"
            )),
        )?;
        set_fence(Some(fence));
        return Ok(Step::Later);
    }
    set_waiting_for(job_id, None)?;
    pause_point("final_check")?;
    // No partition can be attached (or child added) to a registered table
    // until this step ends: ATTACH PARTITION and ALTER TABLE ... INHERIT
    // take this lock too, so the sync below sees every partition there is.
    lock_registered_parents()?;
    if cover_new_registrations(job_id)? > 0 || rotating_keys()? != fence.keys {
        return Ok(Step::Again); // start over: the fence is dropped
    }
    match check(job_id)? {
        Checked::Left => Ok(Step::Later),
        Checked::Stuck(n) => needs_attention(job_id, kind, n),
        Checked::Clean => {
            // on a Citus coordinator: check #2 on every worker node too
            if crate::jobs::cluster::coordinates(kind)?
                && !crate::jobs::cluster::nodes_ready(job_id, true, false)?
            {
                return Ok(Step::Later);
            }
            pause_point("retire")?;
            retire(job_id, kind, &fence.keys)
        }
    }
}

/// SHARE UPDATE EXCLUSIVE on every registered table that has partitions or
/// inheritance children (the lock ATTACH PARTITION, CREATE TABLE ...
/// PARTITION OF and ALTER TABLE ... INHERIT take on the parent). Waits at
/// most lock_timeout (then the step is retried).
fn lock_registered_parents() -> Result<(), String> {
    let parents = spi::one::<Vec<String>>(
        "SELECT coalesce(array_agg(DISTINCT pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname)), '{}') \
         FROM ekm.registered_column r JOIN pg_catalog.pg_class c ON c.oid = r.tbl \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE r.parent IS NULL AND (c.relkind = 'p' OR c.relhassubclass) \
           AND NOT (r.tbl::oid = ANY ($1::oid[]))",
        // (not a Citus table's shell: a LOCK there is a distributed lock on
        // every node; a partition added to a Citus table arrives as shard
        // placements, which the retire's last sync finds on each node)
        vec![crate::pg::citus::citus_tables().map_err(e)?.into()],
    )
    .map_err(e)?
    .unwrap_or_default();
    for p in parents {
        Spi::run(&format!("LOCK TABLE {p} IN SHARE UPDATE EXCLUSIVE MODE")).map_err(spi_err)?;
    }
    Ok(())
}

/// Step: the end of a rotation or rollback. The job is marked done if it is
/// still running (a cancel that committed first wins: nothing is retired),
/// then exactly the keys the checks verified are retired.
fn retire(job_id: i64, kind: &str, keys: &[String]) -> Result<Step, String> {
    // durable before anyone hears of it (the batches commit asynchronously)
    Spi::run("SET LOCAL synchronous_commit = on").map_err(spi_err)?;
    let running = one_i64(
        "WITH u AS (UPDATE ekm.rotation_job SET state = 'done', finished_at = clock_timestamp(), waiting_for = NULL, \
                           throttled_by = NULL, throttled_since = NULL \
                    WHERE job_id = $1 AND state = 'running' RETURNING 1) SELECT count(*) FROM u",
        vec![job_id.into()],
    )?;
    if running == 0 {
        return Ok(Step::Stop);
    }
    // on a Citus coordinator: every node's part ends with it (each node
    // marks its own done as it applies the retire, in this transaction)
    if crate::jobs::cluster::coordinates(kind)? {
        crate::jobs::cluster::nodes_done(job_id)?;
    }
    let retired = Spi::connect_mut(|c| -> pgrx::spi::SpiResult<Vec<String>> {
        let mut v = Vec::new();
        for r in c.update(
            "UPDATE ekm.key SET rotation_status = 'retired', retired_at = now() \
             WHERE key_id = ANY($1) AND rotation_status = 'rotating' RETURNING key_id",
            None,
            &[keys.to_vec().into()],
        )? {
            v.push(r.get::<String>(1)?.unwrap_or_default());
        }
        Ok(v)
    })
    .map_err(spi_err)?;
    finish(job_id, kind, &retired)
}

/// The number of values in each of `quoted` (identifiers quoted by
/// PostgreSQL) of `table` for which `pred` holds: one scan, as the table's
/// owner (security-restricted), like the batches. `pred` has `{c}` for the
/// column and `{ctx}` for its context (bound), from `contexts` (same order).
fn count_values(
    table: &owner::Table,
    quoted: &[String],
    contexts: &[String],
    pred: &str,
) -> Result<Vec<i64>, String> {
    let counts = quoted
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let p = pred
                .replace("{c}", q)
                .replace("{ctx}", &format!("${}::pg_catalog.text", i + 1));
            format!("pg_catalog.count(*) FILTER (WHERE {p})")
        })
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!("SELECT {counts} FROM ONLY {}", table.qualified);
    let uses_ctx = pred.contains("{ctx}");
    let args: Vec<pgrx::datum::DatumWithOid<'_>> = if uses_ctx {
        contexts.iter().map(|c| c.clone().into()).collect()
    } else {
        Vec::new()
    };
    let _gate = crate::jobs::batchfn::BatchGate::open(contexts);
    table
        .as_owner(|| {
            Spi::connect(|c| -> pgrx::spi::SpiResult<Vec<i64>> {
                let t = c.select(&sql, Some(1), &args)?;
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
    spi::exec(
        "UPDATE ekm.rotation_cursor c SET state = 'scanning', next_block = 0, passes = passes + 1, skipped_locked = u.n, pass_end = NULL, \
                blocks_total = pg_relation_size(c.tbl) / current_setting('block_size')::bigint \
         FROM unnest($3::name[], $4::bigint[]) AS u(col, n) \
         WHERE c.job_id = $1 AND c.tbl = $2::regclass AND c.col = u.col",
        vec![job_id.into(), tbl.into(), cols.into(), n.into()],
    )
    .map_err(e)?;
    Ok(true)
}

/// Marks the job done, audits and notifies.
fn finish(job_id: i64, kind: &str, retired: &[String]) -> Result<Step, String> {
    // durable before anyone hears of it (the batches commit asynchronously)
    Spi::run("SET LOCAL synchronous_commit = on").map_err(spi_err)?;
    // (a rotation's retire marked it done already; a migration's is still
    // running, unless a cancel committed first: then nothing is reported)
    let Some(rows) = spi::one_mut::<i64>(
        "UPDATE ekm.rotation_job SET state = 'done', finished_at = coalesce(finished_at, clock_timestamp()), waiting_for = NULL, \
                throttled_by = NULL, throttled_since = NULL \
         WHERE job_id = $1 AND state IN ('running', 'done') RETURNING rows_done",
        vec![job_id.into()],
    )
    .map_err(e)?
    else {
        return Ok(Step::Stop);
    };
    let event = match kind {
        "encrypt" => "column_encrypted",
        "rollback" => "rollback_done",
        "scan" => "database_scanned",
        _ => "rotation_done",
    };
    // the tables' size before the job and now (heap, TOAST), and the
    // vacuums behind its batches
    let sizes = if kind == "scan" {
        None
    } else {
        crate::jobs::pace::job_sizes(job_id)?
    };
    let mut fields: Vec<(&str, String)> = vec![
        ("job_id", job_id.to_string()),
        ("kind", kind.to_string()),
        ("rows", rows.to_string()),
        ("retired", retired.join(",")),
    ];
    if let Some(s) = &sizes {
        fields.extend([
            ("heap_bytes_before", s.heap_before.to_string()),
            ("heap_bytes_after", s.heap_after.to_string()),
            ("toast_bytes_before", s.toast_before.to_string()),
            ("toast_bytes_after", s.toast_after.to_string()),
            ("vacuums", s.vacuums.to_string()),
        ]);
    }
    let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    catalog::audit(event, None, &catalog::json_object(&fields)).map_err(e)?;
    notify(job_id, kind, "done")?;
    pgrx::log!(
        "ekm: {kind} job {job_id} done: {rows} values {}{}{}",
        match kind {
            "encrypt" => "encrypted",
            "scan" => "found",
            _ => "re-encrypted",
        },
        if retired.is_empty() {
            String::new()
        } else {
            format!(", retired {}", retired.join(", "))
        },
        sizes.map(|s| s.describe()).unwrap_or_default()
    );
    Ok(Step::Stop)
}
