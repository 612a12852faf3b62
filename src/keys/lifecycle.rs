//! Key custody operations: creating a data key (wrapped under the master
//! key at once), activating one (the previous becomes rotating), writing
//! down encryption counts, re-wrapping every key under a new master key, and
//! the key-change lock every key and registration change takes.

use crate::keys::{catalog, keycache, masterkey, shmem};
use crate::pg::owner::as_owner;
use crate::pg::{gucs, spi};
use chrono::Utc;
use ekm_core::crypto::new_data_key;
use ekm_core::{EkmError, KeyId, KeyState};
use pgrx::prelude::*;
type EkmResult<T> = ekm_core::Result<T>;

pub fn create_key(state: KeyState) -> EkmResult<KeyId> {
    create_key_as(state, false)
}

pub fn create_key_as(state: KeyState, bootstrap: bool) -> EkmResult<KeyId> {
    let (_, owner) = catalog::ekm_tables()?;
    let master = masterkey::load()?;
    let kcv = master.check_value().to_vec();
    let id = as_owner(owner, || -> EkmResult<KeyId> {
        // Never mix master keys: a new key is wrapped only under the master
        // key the existing keys were wrapped with.
        for row in catalog::load_keys(owner)? {
            if row.wrapped.is_some() && row.kcv != kcv {
                let fingerprint = ekm_core::crypto::fingerprint_of(&row.kcv);
                let previous = masterkey::load_previous().and_then(|r| r.ok());
                if previous.is_some_and(|p| p.check_value()[..] == row.kcv[..]) {
                    return Err(EkmError::MasterKeyRotationPending {
                        previous: fingerprint,
                        configured: master.fingerprint(),
                    });
                }
                return Err(EkmError::MasterKeyMismatch {
                    key_id: row.id.to_string(),
                    expected: fingerprint,
                    configured: master.fingerprint(),
                });
            }
        }
        for _ in 0..16 {
            let mut s = [0u8; 2];
            ekm_core::crypto::os_random(&mut s)?;
            let id = KeyId::new(Utc::now(), u16::from_be_bytes(s))?;
            let inserted: Option<String> = spi::one_mut(
                "INSERT INTO ekm.key (key_id, rotation_status, created_at, activated_at, bootstrap) \
                 VALUES ($1, $2, now(), CASE WHEN $2 = 'active' THEN now() END, $3) \
                 ON CONFLICT (key_id) DO NOTHING RETURNING key_id",
                vec![id.to_string().into(), state.as_str().into(), bootstrap.into()],
            )?;
            if inserted.is_none() {
                continue; // same second and suffix as an existing key
            }
            let (wrapped, _) = new_data_key(&master, &id)?;
            spi::exec(
                "INSERT INTO ekm.key_material (key_id, wrapped, master_kcv) VALUES ($1, $2, $3)",
                vec![id.to_string().into(), wrapped.into(), kcv.clone().into()],
            )?;
            let source = masterkey::describe(&gucs::master_key_source());
            let detail =
                catalog::json_object(&[("state", state.as_str()), ("master_key_source", &source)]);
            catalog::audit("key_created", Some(&id.to_string()), &detail)?;
            return Ok(id);
        }
        Err(EkmError::Internal("could not find a free key id".into()))
    })?;
    keycache::invalidate_all();
    Ok(id)
}

/// Adds this database's pending encryption counts to `ekm.key.encryptions` (as owner).
pub fn flush_encryption_counts() -> EkmResult<()> {
    // one flush at a time: two would both add the same pending count
    crate::keys::locks::lock_xact(
        crate::keys::locks::EkmLock::CountFlush,
        "write down the encryption counts",
    );
    let keys: Vec<String> = Spi::connect(|c| -> pgrx::spi::SpiResult<Vec<String>> {
        let mut v = Vec::new();
        for r in c.select("SELECT key_id FROM ekm.key", None, &[])? {
            v.push(r.get::<String>(1)?.unwrap_or_default());
        }
        Ok(v)
    })
    .map_err(|e| EkmError::Internal(e.to_string()))?;
    for k in keys {
        // an imported Fernet key's id need not be in ekm's form, and such a
        // key never encrypts: nothing is pending for it
        let Ok(id) = KeyId::parse(&k) else { continue };
        let n = shmem::pending(&id.to_ref());
        if n > 0 {
            spi::exec(
                "UPDATE ekm.key SET encryptions = encryptions + $2 WHERE key_id = $1",
                vec![k.clone().into(), (n as i64).into()],
            )?;
            shmem::flushed(&id.to_ref(), n);
        }
    }
    Ok(())
}

pub fn activate(key_id: &str) -> EkmResult<String> {
    let (_, owner) = catalog::ekm_tables()?;
    let kind = as_owner(owner, || {
        spi::one::<String>(
            "SELECT kind FROM ekm.key WHERE key_id = $1",
            vec![key_id.into()],
        )
    })?;
    if kind.as_deref() == Some("fernet") {
        crate::pg::error::raise_with(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("key {key_id} is an imported Fernet key: ekm never encrypts with it"),
            Some("activate an ekm key (SELECT ekm_activate_key(ekm_create_key())); Fernet values move onto it with ekm_encrypt_column or ekm_rotate".into()),
        );
    }
    let id = KeyId::parse(key_id)?;
    as_owner(owner, || -> EkmResult<()> {
        // waits for a rotation's final step (its check and retire see one
        // set of keys), and for other key changes
        crate::keys::lifecycle::lock_key_changes()?;
        let state: Option<String> = spi::one_mut(
            "SELECT rotation_status FROM ekm.key WHERE key_id = $1 FOR UPDATE",
            vec![id.to_string().into()],
        )?;
        let state: KeyState = state
            .ok_or_else(|| EkmError::UnknownKey(id.to_string()))?
            .parse()?;
        if state == KeyState::Active {
            return Ok(());
        }
        state.check_transition(KeyState::Active, key_id)?;
        if state == KeyState::Retired || state == KeyState::Created {
            // Its material must unwrap under the current master key before it may encrypt.
            let master = masterkey::load()?;
            let row = catalog::load_keys(owner)?.into_iter().find(|r| r.id == id);
            let row = row.ok_or_else(|| EkmError::UnknownKey(id.to_string()))?;
            let w = row.wrapped.ok_or(EkmError::KeyNotUsable {
                key_id: id.to_string(),
                state: KeyState::Destroyed,
                action: "encrypt",
            })?;
            master.unwrap(&id, &w, &row.kcv)?;
        }
        flush_encryption_counts()?;
        spi::exec(
            "UPDATE ekm.key SET rotation_status = 'rotating', rotated_at = now() WHERE rotation_status = 'active'",
            vec![],
        )?;
        spi::exec(
            // a key made active again (rollback) is no longer rotating or retired:
            // its earlier rotated/retired times stay in the audit log
            "UPDATE ekm.key SET rotation_status = 'active', activated_at = now(), rotated_at = NULL, retired_at = NULL WHERE key_id = $1",
            vec![id.to_string().into()],
        )?;
        Ok(())
    })?;
    keycache::invalidate_all();
    Ok(id.to_string())
}

pub fn rotate_master_key() -> EkmResult<Vec<(String, String, String, String)>> {
    let (_, owner) = catalog::ekm_tables()?;
    let new = masterkey::load()?;
    let previous = match masterkey::load_previous() {
        None => None,
        Some(Ok(p)) => Some(p),
        Some(Err(e)) => return Err(e),
    };
    if previous
        .as_ref()
        .is_some_and(|p| p.check_value() == new.check_value())
    {
        crate::pg::error::raise_with(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!(
                "the previous master key setting holds the same key as the current one (fingerprint {})",
                new.fingerprint()
            ),
            Some("set ekm.master_key_file (or _command) to the new key and ekm.previous_master_key_file (or _command) to the old one, then SELECT pg_reload_conf()".into()),
        );
    }
    let rows = as_owner(
        owner,
        || -> EkmResult<Vec<(String, String, String, String)>> {
            crate::keys::lifecycle::lock_key_changes()?;
            // the rows, locked: nothing else re-wraps or destroys them meanwhile
            let keys = Spi::connect_mut(|c| -> pgrx::spi::SpiResult<Vec<(String, Vec<u8>, Vec<u8>, String)>> {
            let mut v = Vec::new();
            for r in c.update(
                "SELECT m.key_id, m.wrapped, m.master_kcv, k.kind FROM ekm.key_material m JOIN ekm.key k USING (key_id) \
                 WHERE m.wrapped IS NOT NULL ORDER BY m.key_id FOR UPDATE OF m",
                None,
                &[],
            )? {
                v.push((
                    r.get::<String>(1)?.unwrap_or_default(),
                    r.get::<Vec<u8>>(2)?.unwrap_or_default(),
                    r.get::<Vec<u8>>(3)?.unwrap_or_default(),
                    r.get::<String>(4)?.unwrap_or_default(),
                ));
            }
            Ok(v)
        })
        .map_err(|e| EkmError::Internal(e.to_string()))?;
            let to = new.fingerprint();
            let mut out = Vec::new();
            let mut rewrapped = 0;
            for (id, wrapped, kcv, kind) in keys {
                let kind = ekm_core::crypto::KeyKind::parse(&kind)?;
                let from = ekm_core::crypto::fingerprint_of(&kcv);
                if kcv[..] == new.check_value()[..] {
                    out.push((
                        id,
                        "already under the configured master key".into(),
                        from,
                        to.clone(),
                    ));
                    continue;
                }
                let Some(p) = previous.as_ref().filter(|p| p.check_value()[..] == kcv[..]) else {
                    // wrapped under neither key: refuse the whole rotation
                    return Err(EkmError::MasterKeyMismatch {
                        key_id: id,
                        expected: from,
                        configured: match &previous {
                            Some(p) => format!("{to} (and previous {})", p.fingerprint()),
                            None => format!("{to} (no previous master key is configured)"),
                        },
                    });
                };
                let (w, k) = p.rewrap(&new, kind, &id, &wrapped, &kcv)?;
                spi::exec(
                    "UPDATE ekm.key_material SET wrapped = $2, master_kcv = $3 WHERE key_id = $1",
                    vec![id.clone().into(), w.into(), k.to_vec().into()],
                )?;
                rewrapped += 1;
                out.push((id, "re-wrapped".into(), from, to.clone()));
            }
            catalog::audit(
                "master_key_rotated",
                None,
                &catalog::json_object(&[
                    ("rewrapped", &rewrapped.to_string()),
                    ("keys", &out.len().to_string()),
                    (
                        "from_fingerprint",
                        &previous
                            .as_ref()
                            .map(|p| p.fingerprint())
                            .unwrap_or_default(),
                    ),
                    ("to_fingerprint", &to),
                    (
                        "master_key_source",
                        &masterkey::describe(&gucs::master_key_source()),
                    ),
                ]),
            )?;
            if rewrapped == 0 {
                pgrx::notice!("ekm: every key is already wrapped under the configured master key (fingerprint {to})");
            } else {
                pgrx::notice!(
                "ekm: {rewrapped} keys re-wrapped under master key fingerprint {to}; once every server (standbys too) has the new key, remove the ekm.previous_master_key_* setting"
            );
            }
            Ok(out)
        },
    )?;
    Ok(rows)
}

/// Serializes ekm_rotate, ekm_rollback, ekm_encrypt_column, ekm_cleanup_old_keys
/// and automatic rotation within a database (until the transaction ends).
/// A lock only ekm takes (src/locks.rs), waited for at most
/// `ekm.lock_wait_timeout`.
pub fn lock_key_changes() -> EkmResult<()> {
    crate::keys::locks::lock_xact(
        crate::keys::locks::EkmLock::KeyChange,
        "change ekm's keys, registrations or jobs",
    );
    Ok(())
}
