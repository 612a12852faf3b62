//! ekm's own serialization: the key-change lock, the encryption-count
//! flush lock and the one-worker-per-job lock.
//!
//! They are heavyweight locks of PostgreSQL's lock manager (waits are
//! queued, deadlock-checked and cancellable, and `pg_locks` shows them as
//! `locktype = 'userlock'`), but with a lock tag no SQL command can request:
//! `pg_advisory_lock` builds `advisory` tags and DDL builds relation and
//! object tags, while these are `userlock` tags (the type PostgreSQL keeps
//! for extensions' own locks). So no role, whatever its privileges, can take
//! one of them and stall ekm; only ekm's functions (and so only the roles
//! that may call them: `ekm_admin`, and the workers) hold them. Until 0.2.0
//! they were advisory locks, which any role that could log in could take.
//!
//! Every wait is bounded: at most `ekm.lock_wait_timeout` (or the caller's
//! own `lock_timeout`, if shorter), then an error that names the holder.

use crate::pg::error::raise_with;
use crate::pg::spi;
use ekm_core::Result;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

/// The tag's class (`pg_locks.classid`): "ekm".
pub const CLASS: u32 = 0x656b6d;

/// One of ekm's locks. `pg_locks.objsubid` tells them apart.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EkmLock {
    /// Serializes key and registration changes with a job's final step
    /// (transaction-scoped; `objid` 0, `objsubid` 1).
    KeyChange,
    /// One flush of the encryption counts at a time (transaction-scoped;
    /// `objid` 0, `objsubid` 2).
    CountFlush,
    /// Held by the worker that runs job `n` (session-scoped; `objid` n,
    /// `objsubid` 3).
    Job(i64),
    /// Held by the worker (a job's own or one of its helpers) working on
    /// the cursor group of table `oid` (session-scoped; `objid` the table,
    /// `objsubid` 4, or 5 for a scan of the database, which runs beside a
    /// rotation): two workers never work on one table at once.
    Claim(pg_sys::Oid, bool),
    /// Held by the worker working on block range `seq` of table `oid`
    /// (ekm.rotation_range; session-scoped; `objid` the table, `objsubid`
    /// 16 + `seq`, `seq` below [`MAX_RANGES`]).
    Range(pg_sys::Oid, u16),
}

/// How many block ranges of one table a job's workers may have at once
/// (`seq` 0 to this - 1).
pub const MAX_RANGES: u16 = 1000;

impl EkmLock {
    fn ids(self) -> (u32, u16) {
        match self {
            EkmLock::KeyChange => (0, 1),
            EkmLock::CountFlush => (0, 2),
            EkmLock::Job(n) => (n as u32, 3),
            EkmLock::Claim(t, scan) => (t.to_u32(), if scan { 5 } else { 4 }),
            EkmLock::Range(t, seq) => (t.to_u32(), 16 + seq.min(MAX_RANGES - 1)),
        }
    }

    fn tag(self) -> pg_sys::LOCKTAG {
        let (objid, sub) = self.ids();
        pg_sys::LOCKTAG {
            locktag_field1: unsafe { pg_sys::MyDatabaseId }.to_u32(),
            locktag_field2: CLASS,
            locktag_field3: objid,
            locktag_field4: sub,
            locktag_type: pg_sys::LockTagType::LOCKTAG_USERLOCK as u8,
            locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
        }
    }

    /// What it is, for messages.
    fn what(self) -> String {
        match self {
            EkmLock::KeyChange => "ekm's key-change lock (held by a job's final step and by key and registration changes)".into(),
            EkmLock::CountFlush => "ekm's encryption-count lock".into(),
            EkmLock::Job(n) => format!("the lock of rotation job {n}"),
            EkmLock::Claim(t, _) => format!("the claim of a rotation worker on table {}", t.to_u32()),
            EkmLock::Range(t, seq) => format!("the claim of a rotation worker on block range {seq} of table {}", t.to_u32()),
        }
    }

    /// The SQL condition on `pg_locks l` that selects this lock.
    pub fn pg_locks_filter(self) -> String {
        let (objid, sub) = self.ids();
        format!(
            "l.locktype OPERATOR(pg_catalog.=) 'userlock' AND l.database OPERATOR(pg_catalog.=) {db}::pg_catalog.oid \
             AND l.classid OPERATOR(pg_catalog.=) {CLASS}::pg_catalog.oid AND l.objid OPERATOR(pg_catalog.=) {objid}::pg_catalog.oid \
             AND l.objsubid OPERATOR(pg_catalog.=) {sub}",
            db = unsafe { pg_sys::MyDatabaseId }.to_u32()
        )
    }
}

/// The SQL condition on `pg_locks l` that selects the lock of any job (the
/// job's id is `l.objid`, modulo 2^32).
pub fn job_locks_filter() -> String {
    format!(
        "l.locktype OPERATOR(pg_catalog.=) 'userlock' AND l.database OPERATOR(pg_catalog.=) {db}::pg_catalog.oid \
         AND l.classid OPERATOR(pg_catalog.=) {CLASS}::pg_catalog.oid AND l.objsubid OPERATOR(pg_catalog.=) 3",
        db = unsafe { pg_sys::MyDatabaseId }.to_u32()
    )
}

fn acquire(lock: EkmLock, session: bool, wait: bool) -> bool {
    let tag = lock.tag();
    let r = unsafe { pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as i32, session, !wait) };
    r != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
}

/// Takes `lock` until the transaction ends if it is free now.
pub fn try_lock_xact(lock: EkmLock) -> bool {
    acquire(lock, false, false)
}

/// Takes `lock` until the session ends (or [`unlock_session`]) if it is free now.
pub fn try_lock_session(lock: EkmLock) -> bool {
    acquire(lock, true, false)
}

/// Gives back a session-scoped `lock` this backend holds.
pub fn unlock_session(lock: EkmLock) {
    let tag = lock.tag();
    unsafe { pg_sys::LockRelease(&tag, pg_sys::ExclusiveLock as i32, true) };
}

/// The processes holding `lock` now, with what they are ("pid 123 (ekm
/// rotation)"), for messages; empty if none.
pub fn holders(lock: EkmLock) -> Result<String> {
    Ok(spi::one::<String>(
        &format!(
            "SELECT pg_catalog.string_agg('pid ' OPERATOR(pg_catalog.||) l.pid OPERATOR(pg_catalog.||) \
                    coalesce(' (' OPERATOR(pg_catalog.||) nullif(a.backend_type, 'client backend') OPERATOR(pg_catalog.||) ')', ''), ', ') \
             FROM pg_catalog.pg_locks l LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid OPERATOR(pg_catalog.=) l.pid \
             WHERE {} AND l.granted AND l.pid OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid()",
            lock.pg_locks_filter()
        ),
        vec![],
    )?
    .unwrap_or_default())
}

/// The longest ekm waits for one of its locks: `ekm.lock_wait_timeout`,
/// or the caller's `lock_timeout` if that is set and shorter (ms).
fn wait_limit_ms() -> i32 {
    let ours = crate::pg::gucs::lock_wait_timeout_ms();
    let theirs = unsafe { pg_sys::LockTimeout };
    if theirs > 0 {
        ours.min(theirs)
    } else {
        ours
    }
}

/// Takes `lock` until the transaction ends, waiting for it at most
/// [`wait_limit_ms`]; then raises 55P03 naming the holder and what to do.
/// `doing` says what the caller is doing ("activate a key").
pub fn lock_xact(lock: EkmLock, doing: &str) {
    if try_lock_xact(lock) {
        return;
    }
    // who holds it, read before waiting (a caught error leaves no room for
    // a query afterwards)
    let who = holders(lock).unwrap_or_default();
    let limit = wait_limit_ms();
    crate::pg::gucs::in_nest_level(|| {
        crate::pg::gucs::set_in_nest_level(c"lock_timeout", &format!("{limit}ms"));
        wait(lock, limit, &who, doing)
    })
}

/// Waits for `lock` under the `lock_timeout` set by [`lock_xact`]; a
/// timeout becomes 55P03 naming `who` holds it.
fn wait(lock: EkmLock, limit: i32, who: &str, doing: &str) {
    let what = lock.what();
    let (who, doing) = (who.to_string(), doing.to_string());
    PgTryBuilder::new(|| {
        acquire(lock, false, true);
    })
    .catch_when(PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE, move |_| {
        raise_with(
            PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,
            format!(
                "could not {doing}: waited {limit} ms for {what}{}",
                if who.is_empty() { String::new() } else { format!(", held by {who}") }
            ),
            Some(
                "another ekm operation is under way (SELECT * FROM ekm.rotation_progress shows a job's final step; a key change by an ekm_admin holds it until its transaction ends); \
                 try again when it has finished, or raise ekm.lock_wait_timeout"
                    .into(),
            ),
        )
    })
    .execute();
}
