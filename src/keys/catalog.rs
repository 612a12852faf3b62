//! ekm's own tables: where they are, whether their version matches the
//! library, the key rows (wrapped material included) and the audit log.
//! Application roles cannot read `ekm.key_material`: every access runs as
//! the tables' owner (`pg::owner::as_owner`); all values go in as bound
//! parameters.

use crate::pg::owner::{acting_role_name, as_owner};
use crate::pg::spi::{err as spi_err, one};
use ekm_core::{EkmError, KeyId, KeyState, Result};
use pgrx::prelude::*;
use pgrx::spi::SpiResult;

/// `(oid of ekm.key, owner of ekm.key)`, read from the system catalogs,
/// which every role may read.
pub fn key_table() -> Result<(pg_sys::Oid, pg_sys::Oid)> {
    let r = Spi::connect(|c| -> SpiResult<Option<(pg_sys::Oid, pg_sys::Oid)>> {
        let t = c.select(
            "SELECT c.oid, c.relowner FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname OPERATOR(pg_catalog.=) 'ekm' AND c.relname OPERATOR(pg_catalog.=) 'key'",
            Some(1),
            &[],
        )?;
        if t.is_empty() {
            return Ok(None);
        }
        let t = t.first();
        Ok(Some((t.get::<pg_sys::Oid>(1)?.unwrap_or_default(), t.get::<pg_sys::Oid>(2)?.unwrap_or_default())))
    })
    .map_err(spi_err)?;
    r.ok_or_else(|| {
        EkmError::Internal(
            "ekm's tables are missing: is the extension created in this database?".into(),
        )
    })
}

/// Like [`key_table`], for the management functions: they also need ekm's
/// SQL objects to be the version of this library. A server may run a new
/// `ekm.so` before `ALTER EXTENSION ekm UPDATE` has brought the database's
/// objects up to it: encryption and decryption go on working then (the key
/// tables did not change), everything else refuses with a hint.
pub fn ekm_tables() -> Result<(pg_sys::Oid, pg_sys::Oid)> {
    let t = key_table()?;
    require_current_objects()?;
    Ok(t)
}

/// The version of the library, which its SQL objects must have.
pub const LIBRARY_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Errors unless the database's ekm objects are this library's version
/// (checked once per backend once they are: updates only go forward).
pub fn require_current_objects() -> Result<()> {
    static CURRENT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if CURRENT.load(std::sync::atomic::Ordering::Relaxed) {
        return Ok(());
    }
    let installed = one::<String>(
        "SELECT extversion FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'ekm'",
        vec![],
    )?
    .unwrap_or_default();
    if installed != LIBRARY_VERSION {
        return Err(EkmError::ObjectsOutdated {
            installed,
            library: LIBRARY_VERSION,
        });
    }
    CURRENT.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

pub struct KeyRow {
    pub id: KeyId,
    pub state: KeyState,
    pub wrapped: Option<Vec<u8>>,
    pub kcv: Vec<u8>,
}

type RawKeyRow = (String, String, Option<Vec<u8>>, Option<Vec<u8>>);

/// `key_id, rotation_status, wrapped, master_kcv` of the keys `sql` selects
/// (as owner).
fn select_key_rows(owner: pg_sys::Oid, sql: &str) -> Result<Vec<RawKeyRow>> {
    as_owner(owner, || {
        Spi::connect(|c| -> SpiResult<Vec<RawKeyRow>> {
            let mut v = Vec::new();
            for row in c.select(sql, None, &[])? {
                v.push((
                    row.get::<String>(1)?.unwrap_or_default(),
                    row.get::<String>(2)?.unwrap_or_default(),
                    row.get::<Vec<u8>>(3)?,
                    row.get::<Vec<u8>>(4)?,
                ));
            }
            Ok(v)
        })
        .map_err(spi_err)
    })
}

/// Every key with its material (as owner).
pub fn load_keys(owner: pg_sys::Oid) -> Result<Vec<KeyRow>> {
    // (a new library before ALTER EXTENSION ekm UPDATE: 0.1.0's ekm.key has
    // no kind, and holds only ekm's keys)
    let sql = if require_current_objects().is_ok() {
        "SELECT k.key_id, k.rotation_status, m.wrapped, m.master_kcv \
         FROM ekm.key k LEFT JOIN ekm.key_material m ON m.key_id = k.key_id WHERE k.kind = 'ekm' ORDER BY k.key_id"
    } else {
        "SELECT k.key_id, k.rotation_status, m.wrapped, m.master_kcv \
         FROM ekm.key k LEFT JOIN ekm.key_material m ON m.key_id = k.key_id ORDER BY k.key_id"
    };
    select_key_rows(owner, sql)?
        .into_iter()
        .map(|(id, state, wrapped, kcv)| {
            Ok(KeyRow {
                id: KeyId::parse(&id)?,
                state: state.parse()?,
                wrapped,
                kcv: kcv.unwrap_or_default(),
            })
        })
        .collect()
}

/// An imported Fernet key (`ekm_import_fernet_key`) with its material.
pub struct FernetRow {
    pub id: String,
    pub state: KeyState,
    pub wrapped: Option<Vec<u8>>,
    pub kcv: Vec<u8>,
}

/// Every imported Fernet key, newest first (the order `MultiFernet` tries
/// them in), with its material (as owner).
pub fn load_fernet_keys(owner: pg_sys::Oid) -> Result<Vec<FernetRow>> {
    if require_current_objects().is_err() {
        return Ok(Vec::new()); // objects older than Fernet imports
    }
    select_key_rows(
        owner,
        "SELECT k.key_id, k.rotation_status, m.wrapped, m.master_kcv \
         FROM ekm.key k LEFT JOIN ekm.key_material m ON m.key_id = k.key_id \
         WHERE k.kind = 'fernet' ORDER BY k.created_at DESC, k.key_id",
    )?
    .into_iter()
    .map(|(id, state, wrapped, kcv)| {
        Ok(FernetRow {
            id,
            state: state.parse()?,
            wrapped,
            kcv: kcv.unwrap_or_default(),
        })
    })
    .collect()
}

/// Appends an audit event (as owner). `detail` is a JSON object.
pub fn audit(event: &str, key_id: Option<&str>, detail: &str) -> Result<()> {
    let role = acting_role_name();
    Spi::connect_mut(|c| {
        c.update(
            "INSERT INTO ekm.audit_log (acting_role, event, key_id, detail) VALUES ($1, $2, $3, $4::jsonb)",
            None,
            &[role.into(), event.into(), key_id.into(), detail.into()],
        )
        .map(|_| ())
    })
    .map_err(spi_err)
}

/// A flat JSON object of string values (escaped), for audit details.
pub fn json_object(fields: &[(&str, &str)]) -> String {
    // serde_json escapes every character JSON requires (control characters
    // too: an error message with a tab used to make the audit entry, and so
    // the transaction that ends a failed job, fail)
    let esc = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}: {}", esc(k), esc(v)))
        .collect();
    format!("{{{}}}", body.join(", "))
}
