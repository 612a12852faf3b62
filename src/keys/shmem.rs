//! Live encryption counters per (database, key) in shared memory, so
//! `ekm_encrypt` counts toward the 2^32 random-nonce bound with one atomic
//! add and no table write. The table (`ekm.key.encryptions`) is the truth;
//! these are pending additions, flushed by key management calls. Also the
//! pids of the sessions waiting in `ekm_rotation_wait`.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic, PgLwLock};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

pub const SLOTS: usize = 1024;

#[derive(Copy, Clone, Default)]
#[repr(C)]
pub struct SlotKey {
    db: u32,
    key_ref: [u8; 7],
    used: bool,
}
unsafe impl PGRXSharedMemory for SlotKey {}

static SLOT_KEYS: PgLwLock<[SlotKey; SLOTS]> = unsafe { PgLwLock::new(c"ekm_counter_keys") };
static SLOT_COUNTS: PgAtomic<[AtomicU64; SLOTS]> = unsafe { PgAtomic::new(c"ekm_counter_counts") };

/// Backends waiting in `ekm_rotation_wait` (their pids; 0 = free slot). A
/// rotation's final check waits for the transactions that were running when
/// its passes ended, except these: they only poll the job (and may not have
/// written anything), and they wait for the job themselves.
pub const WAITER_SLOTS: usize = 64;
static WAITERS: PgAtomic<[AtomicI32; WAITER_SLOTS]> =
    unsafe { PgAtomic::new(c"ekm_rotation_waiters") };

pub fn init() {
    pg_shmem_init!(SLOT_KEYS = [SlotKey::default(); SLOTS]);
    pg_shmem_init!(SLOT_COUNTS = std::array::from_fn(|_| AtomicU64::new(0)));
    pg_shmem_init!(WAITERS = std::array::from_fn(|_| AtomicI32::new(0)));
}

#[pg_guard]
unsafe extern "C-unwind" fn unregister_at_exit(_code: i32, _arg: pg_sys::Datum) {
    unregister_waiter();
}

/// Records this backend as waiting for a running rotation job, which will
/// not wait for it: from now on its transaction cannot commit a write
/// (checked at commit). False if every slot is taken. The slot is freed by
/// `unregister_waiter`, and at backend exit.
pub fn register_waiter() -> bool {
    static HOOKS: std::sync::Once = std::sync::Once::new();
    HOOKS.call_once(|| unsafe {
        pg_sys::before_shmem_exit(Some(unregister_at_exit), pg_sys::Datum::from(0));
        pg_sys::RegisterXactCallback(Some(waiter_xact_callback), std::ptr::null_mut());
    });
    GUARDED.store(true, Ordering::Relaxed);
    let pid = unsafe { pg_sys::MyProcPid };
    WAITERS.get().iter().any(|s| {
        s.compare_exchange(0, pid, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    })
}

pub fn unregister_waiter() {
    let pid = unsafe { pg_sys::MyProcPid };
    for s in WAITERS.get().iter() {
        let _ = s.compare_exchange(pid, 0, Ordering::AcqRel, Ordering::Relaxed);
    }
}

/// Set while the current transaction has waited in `ekm_rotation_wait` for a
/// running job (the job may have retired a key without waiting for it).
static GUARDED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[pg_guard]
unsafe extern "C-unwind" fn waiter_xact_callback(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_COMMIT | XACT_EVENT_PRE_PREPARE
            if GUARDED.load(Ordering::Relaxed)
                && unsafe { pg_sys::GetTopTransactionIdIfAny() }
                    != pg_sys::TransactionId::INVALID =>
        {
            GUARDED.store(false, Ordering::Relaxed);
            pgrx::ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "a transaction that waited in ekm_rotation_wait cannot write data",
                "a rotation does not wait for such a transaction before it retires the old key, so a value it read before the wait could be written on the retired key; the transaction is rolled back: write in a new transaction"
            );
        }
        XACT_EVENT_COMMIT
        | XACT_EVENT_ABORT
        | XACT_EVENT_PREPARE
        | XACT_EVENT_PARALLEL_COMMIT
        | XACT_EVENT_PARALLEL_ABORT => {
            GUARDED.store(false, Ordering::Relaxed);
        }
        _ => {}
    }
}

/// The pids of the backends waiting in `ekm_rotation_wait`.
pub fn waiters() -> Vec<i32> {
    WAITERS
        .get()
        .iter()
        .map(|s| s.load(Ordering::Acquire))
        .filter(|&p| p != 0)
        .collect()
}

fn my_db() -> u32 {
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

fn find(keys: &[SlotKey; SLOTS], db: u32, key_ref: &[u8; 7]) -> Option<usize> {
    keys.iter()
        .position(|k| k.used && k.db == db && &k.key_ref == key_ref)
}

/// The counter of a key in this database, allocated on first use. Slots are
/// never reused while the server runs, so a backend may keep the reference.
pub fn counter(key_ref: &[u8; 7]) -> Option<&'static AtomicU64> {
    let db = my_db();
    let idx = {
        let keys = SLOT_KEYS.share();
        find(&keys, db, key_ref)
    };
    let idx = idx.or_else(|| {
        let mut keys = SLOT_KEYS.exclusive();
        find(&keys, db, key_ref).or_else(|| {
            let free = keys.iter().position(|k| !k.used)?;
            keys[free] = SlotKey {
                db,
                key_ref: *key_ref,
                used: true,
            };
            Some(free)
        })
    });
    match idx {
        Some(i) => Some(&SLOT_COUNTS.get()[i]),
        None => {
            pgrx::warning!("ekm: encryption counter table is full ({SLOTS} keys since server start); restart the server to count encryptions again");
            None
        }
    }
}

/// Encryptions under a key not yet added to `ekm.key.encryptions`.
pub fn pending(key_ref: &[u8; 7]) -> u64 {
    let keys = SLOT_KEYS.share();
    find(&keys, my_db(), key_ref).map_or(0, |i| SLOT_COUNTS.get()[i].load(Ordering::Relaxed))
}

/// Marks `n` pending encryptions as written to the table.
pub fn flushed(key_ref: &[u8; 7], n: u64) {
    if n == 0 {
        return;
    }
    let keys = SLOT_KEYS.share();
    if let Some(i) = find(&keys, my_db(), key_ref) {
        SLOT_COUNTS.get()[i].fetch_sub(n, Ordering::Relaxed);
    }
}

/// Databases (oids) that have encryptions not yet written to their `ekm.key`.
pub fn databases_with_pending() -> Vec<u32> {
    let keys = SLOT_KEYS.share();
    let counts = SLOT_COUNTS.get();
    let mut dbs: Vec<u32> = keys
        .iter()
        .zip(counts.iter())
        .filter(|(k, c)| k.used && c.load(Ordering::Relaxed) > 0)
        .map(|(k, _)| k.db)
        .collect();
    dbs.sort_unstable();
    dbs.dedup();
    dbs
}
