//! The per-backend cache of unwrapped data keys. After a key's first use a
//! decrypt does no catalog or table lookup: a linear scan of a handful of
//! entries by the 7-byte key reference. The cache is dropped when another
//! session changes `ekm.key`: a statement trigger there sends a relcache
//! invalidation for the table, which PostgreSQL delivers to every backend
//! (and replays on hot standbys) after commit, before their next statement.

use crate::keys::catalog;
use crate::keys::masterkey;
use crate::keys::shmem;
use ekm_core::crypto::DataKey;
use ekm_core::fernet::{FernetKey, FernetValue};
use ekm_core::format::NONCE_LEN;
use ekm_core::keyid::KEY_REF_LEN;
use ekm_core::{EkmError, KeyId, KeyState, MasterKey, Result};
use pgrx::pg_sys;
use rand::rngs::{StdRng, SysRng};
use rand::{Rng, SeedableRng};
use std::cell::RefCell;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

struct Entry {
    id: KeyId,
    key_ref: [u8; KEY_REF_LEN],
    state: KeyState,
    /// Unwrapped key for decrypt-capable keys; the error for keys that failed to unwrap.
    key: Option<std::result::Result<DataKey, EkmError>>,
    counter: Option<&'static AtomicU64>,
}

/// An imported Fernet key (decrypt only).
struct FernetEntry {
    id: String,
    state: KeyState,
    /// Unwrapped for keys that may decrypt (rotating); the error if that failed.
    key: Option<std::result::Result<FernetKey, EkmError>>,
}

#[derive(Default)]
struct Cache {
    entries: Vec<Entry>,
    /// imported Fernet keys, newest first
    fernet: Vec<FernetEntry>,
    active: Option<usize>,
    owner: pg_sys::Oid,
    /// index of the entry `find` returned last
    last: usize,
    /// statement (its start time) that last reloaded to retry a key whose
    /// material had failed to unwrap: at most one retry per statement, so
    /// a scan over many values on such a key does not reload for each
    last_retry: i64,
    /// statement (its start time) that last reloaded because a value named
    /// a key this backend did not know: at most one such reload per
    /// statement, so a column of values naming unknown keys (planted, or
    /// from another database) costs one reload, not one per row (and not
    /// one master key command per row while a key's material fails)
    last_unknown: i64,
}

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(Cache::default());
    static RNG: RefCell<Option<Nonces>> = const { RefCell::new(None) };
}

/// Set by the invalidation callback; starts set so the first use loads.
static STALE: AtomicBool = AtomicBool::new(true);
static KEY_RELID: AtomicU32 = AtomicU32::new(0);

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn relcache_callback(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let r = relid.to_u32();
    if r == 0 || r == KEY_RELID.load(Ordering::Relaxed) {
        STALE.store(true, Ordering::Relaxed);
    }
}

/// Set when the cache was loaded in a transaction that reads with one
/// snapshot for its whole life (REPEATABLE READ, SERIALIZABLE): the state it
/// read may predate a key change that committed meanwhile (the invalidation
/// arrived, the reload still saw the old state). Such a load serves only
/// until its transaction ends; the next transaction loads again.
static LOADED_UNDER_XACT_SNAPSHOT: AtomicBool = AtomicBool::new(false);

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn xact_callback(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    if matches!(
        event,
        XACT_EVENT_COMMIT
            | XACT_EVENT_ABORT
            | XACT_EVENT_PREPARE
            | XACT_EVENT_PARALLEL_COMMIT
            | XACT_EVENT_PARALLEL_ABORT
    ) && LOADED_UNDER_XACT_SNAPSHOT.swap(false, Ordering::Relaxed)
    {
        STALE.store(true, Ordering::Relaxed);
    }
}

pub fn init() {
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(relcache_callback), pg_sys::Datum::from(0));
        pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut());
    };
}

/// Tells every backend (and standby) to reload its keys once this transaction commits.
pub fn invalidate_all() {
    let relid = KEY_RELID.load(Ordering::Relaxed);
    STALE.store(true, Ordering::Relaxed);
    if relid != 0 {
        unsafe { pg_sys::CacheInvalidateRelcacheByRelid(pg_sys::Oid::from(relid)) };
    }
}

/// Marks this backend's cache stale (e.g. from the key table's trigger).
pub fn invalidate_table(relid: pg_sys::Oid) {
    KEY_RELID.store(relid.to_u32(), Ordering::Relaxed);
    invalidate_all();
}

/// Unwraps one key's material (`unwrap`) under the master key, loading it
/// at most once per reload. A key wrapped under the previous master key (a
/// master key rotation under way: its check value is `kcv`) unwraps under
/// that one. No material: the key was destroyed.
fn unwrap_material<T>(
    master: &mut Option<Result<MasterKey>>,
    previous: &mut Option<Option<Result<MasterKey>>>,
    key_id: &str,
    wrapped: Option<&[u8]>,
    kcv: &[u8],
    unwrap: impl Fn(&MasterKey, &[u8]) -> Result<T>,
) -> Result<T> {
    match (master.get_or_insert_with(masterkey::load), wrapped) {
        (Err(e), _) => Err(e.clone()),
        (Ok(_), None) => Err(EkmError::KeyNotUsable {
            key_id: key_id.to_string(),
            state: KeyState::Destroyed,
            action: "decrypt",
        }),
        (Ok(m), Some(w)) => match unwrap(m, w) {
            Err(e @ EkmError::MasterKeyMismatch { .. }) => {
                match previous.get_or_insert_with(masterkey::load_previous) {
                    Some(Ok(p)) if p.check_value()[..] == kcv[..] => unwrap(p, w),
                    _ => Err(e),
                }
            }
            r => r,
        },
    }
}

impl Cache {
    fn reload(&mut self) -> Result<()> {
        // Cleared first: an invalidation that arrives while we read marks it again.
        STALE.store(false, Ordering::Relaxed);
        if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
            LOADED_UNDER_XACT_SNAPSHOT.store(true, Ordering::Relaxed);
        }
        let r = (|| {
            let (relid, owner) = catalog::key_table()?;
            KEY_RELID.store(relid.to_u32(), Ordering::Relaxed);
            self.owner = owner;
            let rows = catalog::load_keys(owner)?;
            let mut old = std::mem::take(&mut self.entries);
            let mut master: Option<Result<MasterKey>> = None;
            let mut previous: Option<Option<Result<MasterKey>>> = None;
            let mut entries = Vec::with_capacity(rows.len());
            let mut active = None;
            for row in rows {
                let reuse = old
                    .iter()
                    .position(|e| e.id == row.id)
                    .map(|i| old.swap_remove(i));
                let key = if !row.state.can_decrypt() {
                    None // dropping the old entry zeroizes its key schedule
                } else if let Some(Entry {
                    key: Some(Ok(k)), ..
                }) = reuse
                {
                    Some(Ok(k))
                } else {
                    Some(unwrap_material(
                        &mut master,
                        &mut previous,
                        &row.id.to_string(),
                        row.wrapped.as_deref(),
                        &row.kcv,
                        |m, w| m.unwrap(&row.id, w, &row.kcv),
                    ))
                };
                if row.state == KeyState::Active {
                    active = Some(entries.len());
                }
                let key_ref = row.id.to_ref();
                entries.push(Entry {
                    id: row.id,
                    key_ref,
                    state: row.state,
                    key,
                    counter: None,
                });
            }
            self.entries = entries;
            self.active = active;
            // imported Fernet keys: unwrapped the same way, kept by id
            let mut old = std::mem::take(&mut self.fernet);
            let mut fernet = Vec::new();
            for row in catalog::load_fernet_keys(owner)? {
                let reuse = old
                    .iter()
                    .position(|e| e.id == row.id)
                    .map(|i| old.swap_remove(i));
                let key = if !row.state.can_decrypt() {
                    None
                } else if let Some(FernetEntry {
                    key: Some(Ok(k)), ..
                }) = reuse
                {
                    Some(Ok(k))
                } else {
                    Some(unwrap_material(
                        &mut master,
                        &mut previous,
                        &row.id,
                        row.wrapped.as_deref(),
                        &row.kcv,
                        |m, w| m.unwrap_fernet(&row.id, w, &row.kcv),
                    ))
                };
                fernet.push(FernetEntry {
                    id: row.id,
                    state: row.state,
                    key,
                });
            }
            self.fernet = fernet;
            Ok(())
        })();
        if r.is_err() {
            STALE.store(true, Ordering::Relaxed);
            self.entries.clear();
            self.fernet.clear();
            self.active = None;
        }
        r
    }

    fn fresh(&mut self) -> Result<()> {
        if STALE.load(Ordering::Relaxed) {
            self.reload()?;
        }
        Ok(())
    }

    /// `find`, loading once more if the key's material failed to unwrap at
    /// the last load (the master key command failed, a wrong key file): a
    /// fixed cause is seen at the next call that needs the key, while calls
    /// that use other keys pay nothing.
    fn find_usable(&mut self, key_ref: &[u8; KEY_REF_LEN]) -> Result<usize> {
        let i = self.find(key_ref)?;
        if failed(&self.entries[i]) && self.may_retry() {
            self.reload()?;
            return self.find(key_ref);
        }
        Ok(i)
    }

    /// Whether this statement has not yet reloaded to retry a failed key
    /// (and, if so, that it now does).
    fn may_retry(&mut self) -> bool {
        let stmt = unsafe { pg_sys::GetCurrentStatementStartTimestamp() };
        std::mem::replace(&mut self.last_retry, stmt) != stmt
    }

    /// The active key's entry, loading once more if there is none or its
    /// material failed to unwrap at the last load.
    fn active_usable(&mut self) -> Result<usize> {
        self.fresh()?;
        let retry = self.active.is_some_and(|a| failed(&self.entries[a])) && self.may_retry();
        if self.active.is_none() || retry {
            // e.g. a key was activated but this backend loaded before the commit
            self.reload()?;
        }
        self.active.ok_or(EkmError::NoActiveKey)
    }

    /// Reloads because a value names a key this backend does not know, at
    /// most once per statement (see `last_unknown`).
    fn reload_for_unknown(&mut self) -> Result<()> {
        let stmt = unsafe { pg_sys::GetCurrentStatementStartTimestamp() };
        if std::mem::replace(&mut self.last_unknown, stmt) != stmt {
            self.reload()?;
        }
        Ok(())
    }

    fn find(&mut self, key_ref: &[u8; KEY_REF_LEN]) -> Result<usize> {
        self.fresh()?;
        // consecutive values are mostly on the same key
        if let Some(e) = self.entries.get(self.last) {
            if &e.key_ref == key_ref {
                return Ok(self.last);
            }
        }
        if let Some(i) = self.entries.iter().position(|e| &e.key_ref == key_ref) {
            self.last = i;
            return Ok(i);
        }
        // A key created since our last load (its invalidation not yet
        // seen): once per statement.
        self.reload_for_unknown()?;
        self.entries
            .iter()
            .position(|e| &e.key_ref == key_ref)
            .ok_or_else(|| {
                EkmError::UnknownKey(
                    KeyId::from_ref(key_ref)
                        .map(|k| k.to_string())
                        .unwrap_or_else(|_| "?".into()),
                )
            })
    }
}

impl Cache {
    /// `find`, with a key this database does not have as None.
    fn find_known(&mut self, key_ref: &[u8; KEY_REF_LEN]) -> Result<Option<usize>> {
        match self.find(key_ref) {
            Ok(i) => Ok(Some(i)),
            Err(EkmError::UnknownKey(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The entry of `key_ref` if that key is `rotating`.
    fn rotating(&mut self, key_ref: &[u8; KEY_REF_LEN]) -> Result<Option<usize>> {
        Ok(self
            .find_known(key_ref)?
            .filter(|&i| self.entries[i].state == KeyState::Rotating))
    }
}

/// Whether the entry's material failed to unwrap at the last load.
fn failed(e: &Entry) -> bool {
    matches!(e.key, Some(Err(_)))
}

impl Entry {
    /// Counts one encryption under this key in shared memory.
    fn count_encryption(&mut self) {
        if self.counter.is_none() {
            self.counter = shmem::counter(&self.key_ref);
        }
        if let Some(ctr) = self.counter {
            ctr.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn usable<'e>(e: &'e Entry, action: &'static str) -> Result<&'e DataKey> {
    match &e.key {
        Some(Ok(k)) => Ok(k),
        Some(Err(err)) => Err(err.clone()),
        None => Err(EkmError::KeyNotUsable {
            key_id: e.id.to_string(),
            state: e.state,
            action,
        }),
    }
}

/// Runs `f` with the key `key_ref` names, if it may decrypt.
pub fn with_decrypt_key<R>(
    key_ref: &[u8; KEY_REF_LEN],
    f: impl FnOnce(&DataKey) -> Result<R>,
) -> Result<R> {
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        let i = c.find_usable(key_ref)?;
        f(usable(&c.entries[i], "decrypt")?)
    })
}

/// Nonces drawn from a CSPRNG seeded from the OS in this process, 16 at a
/// time (one generator call per 16 values on the per-row paths).
struct Nonces {
    pid: i32,
    rng: StdRng,
    buf: [u8; NONCE_LEN * 16],
    used: usize,
}

/// A fresh nonce (the generator is reseeded, and unused nonces dropped, if
/// the process is a fork of the one that seeded it).
fn nonce() -> Result<[u8; NONCE_LEN]> {
    let pid = unsafe { pg_sys::MyProcPid };
    RNG.with(|r| {
        let mut r = r.borrow_mut();
        if r.as_ref().is_none_or(|g| g.pid != pid) {
            let rng = StdRng::try_from_rng(&mut SysRng)
                .map_err(|e| EkmError::Internal(format!("OS random source failed: {e}")))?;
            *r = Some(Nonces {
                pid,
                rng,
                buf: [0; NONCE_LEN * 16],
                used: NONCE_LEN * 16,
            });
        }
        let g = r.as_mut().expect("seeded above");
        if g.used == g.buf.len() {
            g.rng.fill_bytes(&mut g.buf);
            g.used = 0;
        }
        let mut n = [0u8; NONCE_LEN];
        n.copy_from_slice(&g.buf[g.used..g.used + NONCE_LEN]);
        g.used += NONCE_LEN;
        Ok(n)
    })
}

/// Runs `f` with the active key and a fresh nonce, counting the encryption.
pub fn with_encrypt_key<R>(f: impl FnOnce(&DataKey, &[u8; NONCE_LEN]) -> Result<R>) -> Result<R> {
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        let i = c.active_usable()?;
        let e = &mut c.entries[i];
        let k = usable(e, "encrypt")?;
        let n = nonce()?;
        let r = f(k, &n)?;
        e.count_encryption();
        Ok(r)
    })
}

/// For a value on key `key_ref`: if that key is `rotating`, runs `f` with
/// it, the active key and a fresh nonce, counting the encryption (one cache
/// lookup per value on the rotation's path). `None` when the key is not
/// rotating (or this database does not have it).
pub fn with_rotation<R>(
    key_ref: &[u8; KEY_REF_LEN],
    f: impl FnOnce(&DataKey, &DataKey, &[u8; NONCE_LEN]) -> Result<R>,
) -> Result<Option<R>> {
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        let Some(mut i) = c.rotating(key_ref)? else {
            return Ok(None);
        };
        let failing = c.active.is_some_and(|a| failed(&c.entries[a])) || failed(&c.entries[i]);
        if c.active.is_none() || (failing && c.may_retry()) {
            c.reload()?;
            // looked up again after the reload (which reorders the entries):
            // find reloads no further once the key is found, so the index,
            // its state and the active key's index all come from one load
            let Some(j) = c.rotating(key_ref)? else {
                return Ok(None);
            };
            i = j;
        }
        let a = c.active.ok_or(EkmError::NoActiveKey)?;
        let old = usable(&c.entries[i], "decrypt")?;
        let new = usable(&c.entries[a], "encrypt")?;
        let r = f(old, new, &nonce()?)?;
        c.entries[a].count_encryption();
        Ok(Some(r))
    })
}

/// The active key's id and the owner of ekm's tables.
pub fn active_key_and_owner() -> Result<(Option<KeyId>, pg_sys::Oid)> {
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        c.fresh()?;
        Ok((c.active.map(|i| c.entries[i].id), c.owner))
    })
}

/// The state of the key `key_ref` names, if this database has it.
pub fn state_of(key_ref: &[u8; KEY_REF_LEN]) -> Result<Option<KeyState>> {
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        Ok(c.find_known(key_ref)?.map(|i| c.entries[i].state))
    })
}

// ---- imported Fernet keys (the runbook's values; decrypt only) ----

impl Cache {
    /// The index of the Fernet key `id`, loading once more if this backend
    /// does not know it (imported since the last load).
    fn fernet_index(&mut self, id: &str) -> Result<Option<usize>> {
        self.fresh()?;
        if let Some(i) = self.fernet.iter().position(|e| e.id == id) {
            return Ok(Some(i));
        }
        self.reload_for_unknown()?;
        Ok(self.fernet.iter().position(|e| e.id == id))
    }

    /// Opens a Fernet value into `buf`: the key it names (FERNET_V2), or
    /// each key that may decrypt, newest first (a bare token, as
    /// MultiFernet does). The plaintext's range and the key's index.
    fn fernet_open(&mut self, v: &FernetValue, buf: &mut [u8]) -> Result<(Range<usize>, usize)> {
        match v {
            FernetValue::V2 { key_id, token } => {
                let i = self
                    .fernet_index(key_id)?
                    .ok_or_else(|| EkmError::FernetKeyNotImported(key_id.to_string()))?;
                let e = &self.fernet[i];
                let k = fernet_usable(e)?;
                Ok((k.open_in(token, buf, &format!("Fernet key {}", e.id))?, i))
            }
            FernetValue::Bare { token } => {
                self.fresh()?;
                if self.fernet.is_empty() {
                    self.reload_for_unknown()?;
                }
                if self.fernet.is_empty() {
                    return Err(EkmError::NoFernetKeys);
                }
                let mut first_err = None;
                for (i, e) in self.fernet.iter().enumerate() {
                    let Some(Ok(k)) = &e.key else {
                        continue;
                    };
                    match k.open_in(token, buf, "any imported Fernet key") {
                        Ok(r) => return Ok((r, i)),
                        Err(EkmError::FernetAuthenticationFailed(_)) => {}
                        Err(err) => return Err(err),
                    }
                }
                // none verifies: report the first key that could not be
                // used, if one could not (retired, failed to unwrap)
                for e in &self.fernet {
                    if let Err(err) = fernet_usable(e) {
                        first_err.get_or_insert(err);
                    }
                }
                Err(first_err.unwrap_or(EkmError::FernetAuthenticationFailed(
                    "any imported Fernet key".into(),
                )))
            }
        }
    }
}

fn fernet_usable(e: &FernetEntry) -> Result<&FernetKey> {
    match &e.key {
        Some(Ok(k)) => Ok(k),
        Some(Err(err)) => Err(err.clone()),
        None => Err(EkmError::KeyNotUsable {
            key_id: e.id.clone(),
            state: e.state,
            action: "decrypt",
        }),
    }
}

/// Decrypts a Fernet value into `buf` (scratch of at least
/// `fernet::decoded_capacity(token length)` bytes): where the plaintext is.
pub fn fernet_open(v: &FernetValue, buf: &mut [u8]) -> Result<Range<usize>> {
    CACHE.with(|c| c.borrow_mut().fernet_open(v, buf).map(|(r, _)| r))
}

/// The id of the Fernet key a value is on: named by a FERNET_V2 value; for
/// a bare token, the key that authenticates it.
pub fn fernet_key_id(v: &FernetValue) -> Result<String> {
    match v {
        FernetValue::V2 { key_id, .. } => Ok(key_id.to_string()),
        FernetValue::Bare { token } => {
            let mut scratch = ekm_core::crypto::SecretBuf::new();
            let buf = scratch.take(ekm_core::fernet::decoded_capacity(token.len()))?;
            CACHE.with(|c| {
                let mut c = c.borrow_mut();
                let (_, i) = c.fernet_open(v, buf)?;
                Ok(c.fernet[i].id.clone())
            })
        }
    }
}

/// The state of the imported key a Fernet value is on, if this database has
/// one that names (FERNET_V2) or authenticates (bare token) it.
pub fn fernet_state(v: &FernetValue) -> Result<Option<KeyState>> {
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        match v {
            FernetValue::V2 { key_id, .. } => {
                Ok(c.fernet_index(key_id)?.map(|i| c.fernet[i].state))
            }
            FernetValue::Bare { token } => {
                let mut scratch = ekm_core::crypto::SecretBuf::new();
                let buf = scratch.take(ekm_core::fernet::decoded_capacity(token.len()))?;
                match c.fernet_open(v, buf) {
                    Ok((_, i)) => Ok(Some(c.fernet[i].state)),
                    Err(_) => Ok(None),
                }
            }
        }
    })
}

/// Whether this database has imported any Fernet key (its Fernet values
/// are then values ekm answers for; otherwise they are another scheme's).
pub fn fernet_imported() -> Result<bool> {
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        c.fresh()?;
        Ok(!c.fernet.is_empty())
    })
}
