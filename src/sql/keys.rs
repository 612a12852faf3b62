//! The SQL functions of key custody: key ids and classes of values,
//! `ekm_reencrypt`, creating and activating keys, key status, master key
//! rotation, and the internal functions behind `ekm.keys` and the key
//! table's triggers. Thin: the work is in src/keys/.

use crate::keys::lifecycle::{activate, create_key, create_key_as, rotate_master_key};
use crate::keys::{catalog, keycache, masterkey, shmem};
use crate::pg::error::OrRaise;
use crate::pg::gucs;
use crate::pg::owner::as_owner;
use crate::pg::spi;
use crate::pg::time::{chrono_to_ts, now, ts_to_chrono};
use ekm_core::{format, EkmError, KeyId, KeyState};
type EkmResult<T> = ekm_core::Result<T>;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;

/// Which key encrypted `ciphertext` (read from its header; no lookup).
#[pg_extern(immutable, strict, parallel_safe)]
fn ekm_key_id(ciphertext: &str) -> String {
    match format::key_of(ciphertext) {
        Ok(k) => k.to_string(),
        // the runbook's values: the imported key's id (named by FERNET_V2;
        // for a bare token, the key that authenticates it)
        Err(EkmError::NotCiphertext) => match ekm_core::fernet::parse(ciphertext.as_bytes()) {
            Some(fv) => keycache::fernet_key_id(&fv).or_raise(),
            None => crate::pg::error::raise(EkmError::NotCiphertext),
        },
        Err(e) => crate::pg::error::raise(e),
    }
}

/// Whether `value` is an ekm ciphertext (of any format version) or one of
/// the runbook's Fernet values (`FERNET_V2:<key_id>:<token>`, a bare
/// token). Never raises.
#[pg_extern(immutable, strict, parallel_safe)]
fn ekm_is_encrypted(value: &str) -> bool {
    format::looks_encrypted(value) || ekm_core::fernet::parse(value.as_bytes()).is_some()
}

/// The same plaintext under the active key; never returns plaintext. A value
/// already on the active key is checked (it must decrypt) and returned as is.
#[pg_extern(volatile, parallel_safe)]
fn ekm_reencrypt(
    ciphertext: Option<&str>,
    context: default!(Option<&str>, "NULL"),
) -> Option<String> {
    let ct = ciphertext?;
    crate::pg::redact::note_plaintext();
    Some(reencrypt(ct, context.unwrap_or("").as_bytes()).or_raise())
}

pub fn reencrypt(ct: &str, ctx: &[u8]) -> EkmResult<String> {
    let key = format::key_of(ct)?;
    let plain = keycache::with_decrypt_key(&key.to_ref(), |k| k.open(ct, ctx))?;
    let (active, _) = keycache::active_key_and_owner()?;
    if active == Some(key) {
        // input-sized: copied fallibly (53200, not an abort of the backend)
        return ekm_core::crypto::try_copy_str(ct);
    }
    keycache::with_encrypt_key(|k, nonce| k.seal(nonce, &plain, ctx))
}

/// Creates a new data key in state `created` (it does nothing until activated).
#[pg_extern(volatile)]
fn ekm_create_key() -> String {
    create_key(KeyState::Created).or_raise().to_string()
}

/// Makes `key_id` the one active key. The previously active key becomes
/// `rotating` (it still decrypts the values written under it).
#[pg_extern(volatile)]
fn ekm_activate_key(key_id: &str) -> String {
    activate(key_id).or_raise()
}

/// The runbook's `get_key_status()`, as one row.
///
/// (Its C symbol is new in 0.2.0, which added `master_key_fingerprint`: the
/// 0.1.0 definition, with a column less, must never reach this code.)
#[pg_extern(stable, name = "ekm_key_status")]
fn ekm_key_status_v2() -> TableIterator<
    'static,
    (
        name!(current_key_id, Option<String>),
        name!(active_keys_count, i64),
        name!(decrypt_keys_count, i64),
        name!(keys_with_material, i64),
        name!(keys_needing_rotation, i64),
        name!(current_key_age_days, Option<i64>),
        name!(current_key_expires_at, Option<TimestampWithTimeZone>),
        name!(current_key_encryptions, Option<i64>),
        name!(next_rotation_due, Option<TimestampWithTimeZone>),
        name!(rotation_alert_at, Option<TimestampWithTimeZone>),
        name!(master_key_source, String),
        name!(master_key_fingerprint, Option<String>),
    ),
> {
    let (_, owner) = catalog::ekm_tables().or_raise();
    let rows = as_owner(owner, || {
        Spi::connect(|c| -> pgrx::spi::SpiResult<Vec<(String, String, TimestampWithTimeZone, i64, bool)>> {
            let mut v = Vec::new();
            for r in c.select(
                "SELECT k.key_id, k.rotation_status, k.created_at, k.encryptions, m.wrapped IS NOT NULL \
                 FROM ekm.key k LEFT JOIN ekm.key_material m USING (key_id) ORDER BY k.key_id",
                None,
                &[],
            )? {
                v.push((
                    r.get::<String>(1)?.unwrap_or_default(),
                    r.get::<String>(2)?.unwrap_or_default(),
                    r.get::<TimestampWithTimeZone>(3)?.expect("not null"),
                    r.get::<i64>(4)?.unwrap_or(0),
                    r.get::<bool>(5)?.unwrap_or(false),
                ));
            }
            Ok(v)
        })
    })
    .map_err(|e| EkmError::Internal(e.to_string()))
    .or_raise();
    let policy = gucs::policy();
    let now = now();
    let (mut active, mut decrypt, mut material, mut due) = (0i64, 0i64, 0i64, 0i64);
    let mut current = None;
    for (id, state, created, stored, has_material) in &rows {
        let state: KeyState = state.parse().or_raise();
        if state == KeyState::Active {
            active += 1;
            let pending = KeyId::parse(id)
                .map(|k| shmem::pending(&k.to_ref()))
                .unwrap_or(0) as i64;
            let a = policy.evaluate(ts_to_chrono(*created), now, stored + pending);
            if a.needs_rotation {
                due += 1;
            }
            current = Some((id.clone(), a, stored + pending));
        }
        if state.can_decrypt() {
            decrypt += 1;
        }
        if *has_material {
            material += 1;
        }
    }
    let warn = chrono::Duration::days(policy.warning_days as i64);
    TableIterator::once((
        current.as_ref().map(|c| c.0.clone()),
        active,
        decrypt,
        material,
        due,
        current.as_ref().map(|c| c.1.age_days),
        current.as_ref().map(|c| chrono_to_ts(c.1.expires_at)),
        current.as_ref().map(|c| c.2),
        current.as_ref().map(|c| chrono_to_ts(c.1.due_at)),
        current.as_ref().map(|c| chrono_to_ts(c.1.due_at - warn)),
        masterkey::describe(&gucs::master_key_source()),
        masterkey::load().ok().map(|m| m.fingerprint()),
    ))
}

/// Re-wraps every data key that has material under the configured master
/// key, in one transaction: keys wrapped under the previous master key
/// (`ekm.previous_master_key_command` / `_file`) are unwrapped with it and
/// wrapped again; keys already under the configured key are left as they
/// are. No value is touched (the data keys do not change). Idempotent. On
/// a Citus coordinator the re-wrapped keys reach every worker node at
/// commit, in the distributed transaction; a node that does not load the
/// new master key refuses them, and nothing changes on any node.
#[pg_extern(volatile)]
fn ekm_rotate_master_key() -> TableIterator<
    'static,
    (
        name!(key_id, String),
        name!(action, String),
        name!(from_fingerprint, String),
        name!(to_fingerprint, String),
    ),
> {
    crate::pg::error::refuse_on_standby("rotate the master key", "ekm_rotate_master_key()");
    if crate::pg::citus::node().or_raise() == crate::pg::citus::Node::Worker {
        crate::pg::error::raise_with(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "this is a Citus worker node: ekm's keys are managed on the coordinator".into(),
            Some("configure the new master key (and the old one as the previous) on every node, reload, then SELECT * FROM ekm_rotate_master_key() on the coordinator".into()),
        );
    }
    TableIterator::new(rotate_master_key().or_raise())
}

#[pg_schema]
mod ekm {
    use super::*;
    use pgrx::{PgTrigger, PgTriggerError, WhoAllocated};

    /// Key policy figures for one key, for the `ekm.keys` view.
    #[pg_extern(stable, parallel_safe)]
    fn _ekm_key_policy(
        key_id: &str,
        created_at: TimestampWithTimeZone,
        stored_encryptions: i64,
    ) -> TableIterator<
        'static,
        (
            name!(expires_at, TimestampWithTimeZone),
            name!(age_days, i64),
            name!(expires_in_days, i64),
            name!(rotation_due_at, TimestampWithTimeZone),
            name!(needs_rotation, bool),
            name!(encryptions, i64),
        ),
    > {
        let pending = KeyId::parse(key_id)
            .map(|k| shmem::pending(&k.to_ref()))
            .unwrap_or(0) as i64;
        let enc = stored_encryptions + pending;
        let a = gucs::policy().evaluate(ts_to_chrono(created_at), now(), enc);
        TableIterator::once((
            chrono_to_ts(a.expires_at),
            a.age_days,
            a.expires_in_days,
            chrono_to_ts(a.due_at),
            a.needs_rotation,
            enc,
        ))
    }

    /// Creates the first key when the extension is created.
    #[pg_extern(volatile)]
    fn _ekm_bootstrap_key() -> String {
        // a Citus worker node gets the coordinator's keys (keys::cluster),
        // none of its own
        if crate::pg::citus::node().or_raise() == crate::pg::citus::Node::Worker {
            return "none: a Citus worker node receives the coordinator's keys".into();
        }
        create_key_as(KeyState::Active, true).or_raise().to_string()
    }

    thread_local! {
        static RESTORE_DEMOTION: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// BEFORE INSERT of an active key (only pg_restore inserts one): the
    /// dump's keys take over from the unused key CREATE EXTENSION made,
    /// which is retired, never deleted. Anything else is refused.
    #[pg_trigger]
    fn _ekm_key_restore<'a>(
        trigger: &'a PgTrigger<'a>,
    ) -> std::result::Result<Option<PgHeapTuple<'a, impl WhoAllocated>>, PgTriggerError> {
        let new = trigger.new().expect("row trigger on INSERT");
        let incoming = new
            .get_by_name::<String>("key_id")
            .ok()
            .flatten()
            .unwrap_or_default();
        let current = Spi::get_three::<String, i64, bool>(
            "SELECT key_id, encryptions, bootstrap FROM ekm.key WHERE rotation_status = 'active'",
        );
        if let Ok((Some(k), Some(stored), Some(bootstrap))) = current {
            let pending = KeyId::parse(&k)
                .map(|id| shmem::pending(&id.to_ref()))
                .unwrap_or(1);
            if !(bootstrap && stored == 0 && pending == 0) {
                crate::pg::error::raise_with(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!("key {k} is already active in this database; cannot add active key {incoming}"),
                    Some("restore a dump's ekm keys only into a database where ekm has made nothing but its unused first key; make keys with ekm_create_key()".into()),
                );
            }
            RESTORE_DEMOTION.with(|d| d.set(true));
            let r = spi::exec(
                "UPDATE ekm.key SET rotation_status = 'retired', rotated_at = now(), retired_at = now() WHERE key_id = $1",
                vec![k.clone().into()],
            )
            .and_then(|_| {
                catalog::audit(
                    "key_replaced_by_restore",
                    Some(&k),
                    &catalog::json_object(&[("restored_active_key", &incoming)]),
                )
            });
            RESTORE_DEMOTION.with(|d| d.set(false));
            r.or_raise();
        }
        Ok(Some(new))
    }

    /// Statement trigger on `ekm.key`: every backend reloads its keys after commit.
    #[pg_trigger]
    fn _ekm_key_changed<'a>(
        trigger: &'a PgTrigger<'a>,
    ) -> std::result::Result<Option<PgHeapTuple<'a, impl WhoAllocated>>, PgTriggerError> {
        keycache::invalidate_table(trigger.relid()?);
        Ok(None::<PgHeapTuple<'a, pgrx::AllocatedByRust>>)
    }

    /// Row trigger on `ekm.key`, BEFORE UPDATE (so that it answers before
    /// the foreign key from ekm.key_material does): only lifecycle
    /// transitions the core allows, ids and creation times never change, and
    /// every transition is audited (in the same transaction: an update that
    /// fails later takes its audit row with it).
    #[pg_trigger]
    fn _ekm_key_transition<'a>(
        trigger: &'a PgTrigger<'a>,
    ) -> std::result::Result<Option<PgHeapTuple<'a, impl WhoAllocated>>, PgTriggerError> {
        let (Some(old), Some(new)) = (trigger.old(), trigger.new()) else {
            return Ok(None::<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>);
        };
        let get = |t: &PgHeapTuple<'_, _>, c: &str| -> String {
            t.get_by_name::<String>(c)
                .ok()
                .flatten()
                .unwrap_or_default()
        };
        let key_id = get(&old, "key_id");
        if get(&new, "key_id") != key_id
            || get(&new, "kind") != get(&old, "kind")
            || old
                .get_by_name::<TimestampWithTimeZone>("created_at")
                .ok()
                .flatten()
                != new
                    .get_by_name::<TimestampWithTimeZone>("created_at")
                    .ok()
                    .flatten()
        {
            crate::pg::error::raise_with(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("the id, kind and creation time of key {key_id} cannot change"),
                Some("keys are managed with ekm_* functions, not by editing ekm.key".into()),
            );
        }
        let from: KeyState = get(&old, "rotation_status").parse().or_raise();
        // a state that is not one: the table's CHECK constraint refuses it
        let Ok(to) = get(&new, "rotation_status").parse::<KeyState>() else {
            return Ok(Some(new));
        };
        if from != to {
            let restoring = RESTORE_DEMOTION.with(|d| d.get())
                && from == KeyState::Active
                && to == KeyState::Retired;
            if !restoring {
                from.check_transition(to, &key_id).or_raise();
            }
            catalog::audit(
                &format!("key_{to}"),
                Some(&key_id),
                &catalog::json_object(&[("from", from.as_str()), ("to", to.as_str())]),
            )
            .or_raise();
        }
        // the row as it is to be written (a BEFORE trigger's answer)
        Ok(Some(new))
    }
}
