//! Reading the values of registered columns for the caller: counts by key
//! and class for `ekm.registered_columns`, the dry runs, `ekm_health()` and
//! `ekm_cleanup_old_keys`. The rows are read as the table's owner in a
//! security-restricted operation (`owner::as_table_owner`) and classified
//! here, in Rust: the SQL ekm runs against the table names only the table,
//! its columns and `pg_catalog`, and no ekm function has to be executable by
//! the table's owner.
use crate::keys::keycache;
use crate::pg::owner::{self, Table};
use crate::pg::spi;
use ekm_core::crypto::SecretBuf;
use ekm_core::{format, EkmError, KeyId, KeyState};
use pgrx::prelude::*;
use std::collections::BTreeMap;

type EkmResult<T> = ekm_core::Result<T>;

/// Rows fetched per round trip of the cursor.
const FETCH: i64 = 1000;

/// The key id `ekm.ciphertext_scan` records, with 0 values, for each text
/// column of a foreign table: a scan reads only this database's own
/// tables, so what a foreign table holds is unknown and cleanup's guard
/// keeps every retired key (ops.rs, `scan_verdict`).
pub const NOT_SCANNED_FOREIGN: &str = "not scanned: foreign table";

/// The same for a column of a table whose owner may not read it (the scan
/// reads every table as its owner).
pub const NOT_SCANNED_UNREADABLE: &str = "not scanned: its owner may not read it";

/// The same for a column of a Citus distributed or reference table on the
/// coordinator: its rows are in shards on the worker nodes, which the scan
/// does not reach (README, "Scaling out with Citus").
pub const NOT_SCANNED_CITUS: &str =
    "not scanned: Citus table (its rows are in shards on the worker nodes)";

/// The class of a stored value: null, plaintext, foreign (another scheme's
/// ciphertext), malformed, unknown (a key this database does not have), or
/// the state of the key it names.
pub fn value_class(v: Option<&str>) -> EkmResult<&'static str> {
    let Some(v) = v else { return Ok("null") };
    if !format::looks_encrypted(v) {
        // the runbook's values, once its keys are imported: "fernet" on a
        // rotating imported key (it moves), "fernet_undecryptable" if no
        // imported key that may decrypt names or authenticates it
        if let Some(fv) = ekm_core::fernet::parse(v.as_bytes()) {
            if keycache::fernet_imported()? {
                return Ok(match keycache::fernet_state(&fv)? {
                    Some(KeyState::Rotating) => "fernet",
                    _ => "fernet_undecryptable",
                });
            }
        }
        return Ok(if format::looks_foreign(v) {
            "foreign"
        } else {
            "plaintext"
        });
    }
    let Ok(k) = format::key_of(v) else {
        return Ok("malformed");
    };
    Ok(match keycache::state_of(&k.to_ref())? {
        None => "unknown",
        Some(s) => s.as_str(),
    })
}

/// What one column holds.
#[derive(Default, Debug)]
pub struct Census {
    /// values per class ([`value_class`])
    pub by_class: BTreeMap<&'static str, i64>,
    /// ekm ciphertexts per key they name (with that key's class)
    pub by_key: BTreeMap<KeyId, (&'static str, i64)>,
    /// Fernet values on rotating imported keys, per key id
    pub by_fernet_key: BTreeMap<String, i64>,
    /// FERNET_V2 values per key id they name, whatever that key's state
    /// (once keys are imported): what cleanup must not destroy
    pub fernet_named: BTreeMap<String, i64>,
    /// bare tokens no imported key still decrypting authenticates (once keys
    /// are imported): they may be on any retired imported key
    pub fernet_bare_unattributed: i64,
    /// values on a key that decrypts which do not open with the column's
    /// context (bound to another context, or altered); counted only when
    /// asked for
    pub wrong_context: i64,
}

impl Census {
    pub fn count(&self, classes: &[&str]) -> i64 {
        classes
            .iter()
            .map(|c| self.by_class.get(c).copied().unwrap_or(0))
            .sum()
    }
}

/// Whether `v` (on a key that decrypts) opens with `context`.
fn opens_with(v: &str, context: &[u8]) -> bool {
    let Ok(k) = format::key_of(v) else {
        return false;
    };
    keycache::with_decrypt_key(&k.to_ref(), |key| {
        let mut scratch = SecretBuf::new();
        let bin = scratch.take(format::decoded_len(v)?)?;
        let n = format::decode_into(v, bin)?;
        key.open_decoded(&mut bin[..n], context).map(|_| ())
    })
    .is_ok()
}

/// Reads `cols` (name, context) of `t` as its owner, in one scan, and
/// counts what they hold. With `check_context`, values on a key that
/// decrypts are also opened with the column's context.
pub fn census(t: &Table, cols: &[(String, String)], check_context: bool) -> EkmResult<Vec<Census>> {
    let list = cols
        .iter()
        .map(|(c, _)| format!("{}::pg_catalog.text", owner::quote_ident(c)))
        .collect::<Vec<_>>()
        .join(", ");
    // ONLY: the partitions and inheritance children of a registered table
    // are registered tables of their own
    let sql = format!("SELECT {list} FROM ONLY {}", t.qualified);
    let mut out: Vec<Census> = cols.iter().map(|_| Census::default()).collect();
    t.as_owner(|| {
        Spi::connect(|c| -> EkmResult<()> {
            let mut cursor = c.open_cursor(sql.as_str(), &[]);
            loop {
                let rows = cursor.fetch(FETCH).map_err(spi_err)?;
                if rows.is_empty() {
                    return Ok(());
                }
                for row in rows {
                    for (i, (_, context)) in cols.iter().enumerate() {
                        let v = row.get::<&str>(i + 1).map_err(spi_err)?;
                        let class = value_class(v)?;
                        let n = &mut out[i];
                        *n.by_class.entry(class).or_insert(0) += 1;
                        if matches!(class, "fernet" | "fernet_undecryptable") {
                            if let Some(fv) = v.and_then(|v| ekm_core::fernet::parse(v.as_bytes()))
                            {
                                match fv {
                                    ekm_core::fernet::FernetValue::V2 { key_id, .. } => {
                                        *n.fernet_named.entry(key_id.to_string()).or_insert(0) += 1
                                    }
                                    ekm_core::fernet::FernetValue::Bare { .. }
                                        if class == "fernet_undecryptable" =>
                                    {
                                        n.fernet_bare_unattributed += 1
                                    }
                                    _ => {}
                                }
                                if class == "fernet" {
                                    *n.by_fernet_key
                                        .entry(keycache::fernet_key_id(&fv)?)
                                        .or_insert(0) += 1;
                                }
                            }
                        }
                        if let Some(v) = v.filter(|v| format::looks_encrypted(v)) {
                            if let Ok(k) = format::key_of(v) {
                                n.by_key.entry(k).or_insert((class, 0)).1 += 1;
                            }
                            if check_context
                                && matches!(class, "active" | "rotating")
                                && !opens_with(v, context.as_bytes())
                            {
                                n.wrong_context += 1;
                            }
                        }
                    }
                }
            }
        })
    })?;
    Ok(out)
}

fn spi_err(e: pgrx::spi::Error) -> EkmError {
    EkmError::Internal(format!("reading the table failed: {e}"))
}

/// A column's type, and whether ekm ciphertexts can be stored in it (text
/// or varchar, or a domain over one of them); None if the relation has no
/// such column.
pub fn column_type(tbl: pg_sys::Oid, col: &str) -> EkmResult<Option<(String, bool)>> {
    let (ty, typid) = spi::two::<String, pg_sys::Oid>(
        "SELECT pg_catalog.format_type(a.atttypid, a.atttypmod), a.atttypid \
         FROM pg_catalog.pg_attribute a \
         WHERE a.attrelid OPERATOR(pg_catalog.=) $1 AND a.attname OPERATOR(pg_catalog.=) $2::pg_catalog.name \
           AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped",
        vec![tbl.into(), col.into()],
    )?;
    // a domain stores its base type; the batches assign text to it, and
    // its constraints are checked as for the application's own UPDATE
    let base = typid.map(|t| unsafe { pg_sys::getBaseType(t) });
    let is_text = matches!(base, Some(b) if b == pg_sys::TEXTOID || b == pg_sys::VARCHAROID);
    Ok(ty.map(|t| (t, is_text)))
}

/// A registered column ekm can read for the caller, or why not: the table
/// is gone or not a table, the column is gone or not text, or (with
/// `for_caller`) the caller may not SELECT it.
pub fn readable(tbl: pg_sys::Oid, col: &str, for_caller: bool) -> EkmResult<Result<Table, String>> {
    let name = owner::display_name(tbl);
    let Some(t) = Table::lookup(tbl) else {
        return Ok(Err(format!(
            "the table (OID {}) no longer exists",
            tbl.to_u32()
        )));
    };
    if !t.is_table() {
        return Ok(Err(format!("{name} is {}, not a table", t.kind_name())));
    }
    match column_type(tbl, col)? {
        None => return Ok(Err(format!("column \"{col}\" of {name} no longer exists"))),
        Some((ty, false)) => {
            return Ok(Err(format!("column \"{col}\" of {name} is {ty}, not text")))
        }
        Some(_) => {}
    }
    if for_caller && !owner::caller_may_read(tbl, col)? {
        return Ok(Err(format!(
            "permission denied: {} may not SELECT column \"{col}\" of {name}",
            owner::acting_role_name()
        )));
    }
    Ok(Ok(t))
}

/// Why a value on a rotating key cannot be moved with `context`, and the key
/// it names: for ekm.rotation_problem. Never the value itself.
pub fn why_stuck(v: &str, context: &str) -> (Option<String>, String) {
    if let Some(fv) = ekm_core::fernet::parse(v.as_bytes()) {
        let named = match fv {
            ekm_core::fernet::FernetValue::V2 { key_id, .. } => Some(key_id.to_string()),
            ekm_core::fernet::FernetValue::Bare { .. } => None,
        };
        let mut scratch = SecretBuf::new();
        let r = scratch
            .take(ekm_core::fernet::decoded_capacity(fv.token().len()))
            .and_then(|buf| keycache::fernet_open(&fv, buf).map(|_| ()));
        let reason = match r {
            Ok(()) => "it decrypts now (fixed since the check)".to_string(),
            Err(EkmError::FernetKeyNotImported(_) | EkmError::NoFernetKeys) => match &named {
                Some(id) => format!("a Fernet value on key {id}, which is not imported (SELECT ekm_import_fernet_key(...))"),
                None => "a Fernet value, and no Fernet key is imported".into(),
            },
            Err(err) => format!("a Fernet value that does not decrypt: {err}"),
        };
        return (named, reason);
    }
    let Ok(k) = format::key_of(v) else {
        return (None, "malformed ekm ciphertext".into());
    };
    let r = keycache::with_decrypt_key(&k.to_ref(), |key| {
        let mut scratch = SecretBuf::new();
        let bin = scratch.take(format::decoded_len(v)?)?;
        let n = format::decode_into(v, bin)?;
        key.open_decoded(&mut bin[..n], context.as_bytes())
            .map(|_| ())
    });
    let reason = match r {
        Ok(()) => "it decrypts now (fixed since the check)".to_string(),
        Err(EkmError::AuthenticationFailed(_)) => format!(
            "does not decrypt with the column's context '{context}': bound to another context, or altered"
        ),
        Err(EkmError::Malformed(m)) => format!("malformed ekm ciphertext ({m})"),
        Err(err) => err.to_string(),
    };
    (Some(k.to_string()), reason)
}

/// Registered columns: (table oid, column, shown name, whether it exists as a text column).
pub fn registered_columns() -> EkmResult<Vec<(pg_sys::Oid, String, String, bool)>> {
    Spi::connect(|c| -> pgrx::spi::SpiResult<Vec<(pg_sys::Oid, String, String, bool)>> {
        let mut v = Vec::new();
        for r in c.select(
            "SELECT r.tbl::oid, r.col::text, r.tbl::text || '.' || r.col, \
                    (SELECT a.atttypid FROM pg_catalog.pg_attribute a WHERE a.attrelid = r.tbl AND a.attname = r.col \
                            AND a.attnum > 0 AND NOT a.attisdropped) \
             FROM ekm.registered_column r ORDER BY 3",
            None,
            &[],
        )? {
            v.push((
                r.get::<pg_sys::Oid>(1)?.unwrap_or_default(),
                r.get::<String>(2)?.unwrap_or_default(),
                r.get::<String>(3)?.unwrap_or_default(),
                // text or varchar, or a domain over one of them
                r.get::<pg_sys::Oid>(4)?.is_some_and(|t| {
                    let b = unsafe { pg_sys::getBaseType(t) };
                    b == pg_sys::TEXTOID || b == pg_sys::VARCHAROID
                }),
            ));
        }
        Ok(v)
    })
    .map_err(crate::pg::error::internal)
}

/// "key_a: 3, key_b: 5": Fernet values per imported key, for notes.
pub fn fernet_by_key(n: &Census) -> String {
    n.by_fernet_key
        .iter()
        .map(|(k, c)| format!("{k}: {c}"))
        .collect::<Vec<_>>()
        .join(", ")
}
