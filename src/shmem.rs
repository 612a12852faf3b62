//! Live encryption counters per (database, key) in shared memory, so
//! `ekm_encrypt` counts toward the 2^32 random-nonce bound with one atomic
//! add and no table write. The table (`ekm.key.encryptions`) is the truth;
//! these are pending additions, flushed by key management calls.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic, PgLwLock};
use std::sync::atomic::{AtomicU64, Ordering};

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

pub fn init() {
    pg_shmem_init!(SLOT_KEYS = [SlotKey::default(); SLOTS]);
    pg_shmem_init!(SLOT_COUNTS = std::array::from_fn(|_| AtomicU64::new(0)));
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
