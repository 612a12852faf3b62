//! Adopting the runbook's data: its Fernet keys are imported (wrapped under
//! the master key at once; ekm decrypts with them and never encrypts), its
//! values (`FERNET_V2:<key_id>:<token>`, bare tokens) decrypt with
//! `ekm_decrypt` and move onto ekm keys with `ekm_encrypt_column` and
//! `ekm_rotate` (src/fastpath.rs). docs/runbook.md, "Adopting ekm from the
//! Django EncryptionKeyManager".
use crate::keys::{catalog, keycache, masterkey};
use crate::pg::error::{raise_with, OrRaise};
use crate::pg::gucs;
use crate::pg::owner::as_owner;
use crate::pg::spi;
use crate::pg::time::{chrono_to_ts, ts_to_chrono};
use ekm_core::crypto::KeyKind;
use ekm_core::fernet::{self, FernetKey};
use ekm_core::EkmError;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
type EkmResult<T> = ekm_core::Result<T>;

/// What the runbook's key ids may be (no ':', which ends the id in
/// `FERNET_V2:<key_id>:<token>`); the table's CHECK says the same.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 100
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-')
}

/// Imports one Fernet key of the runbook's key store, wrapped under the
/// master key: `rotating` (decrypt only, the default) or `retired`. Never
/// active: ekm never writes Fernet. The key text is never stored, logged or
/// audited.
#[pg_extern(volatile)]
fn ekm_import_fernet_key(
    key_id: Option<&str>,
    fernet_key: Option<&str>,
    created_at: default!(Option<TimestampWithTimeZone>, "NULL"),
    state: default!(Option<&str>, "'rotating'"),
) -> String {
    crate::pg::redact::note_plaintext(); // the statement holds key material
    crate::pg::error::refuse_on_standby("import keys", "ekm_import_fernet_key()");
    let not_null = |v: Option<&str>, what: &str| -> String {
        match v {
            Some(v) => v.to_string(),
            None => raise_with(
                PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
                format!("{what} must not be NULL"),
                Some("SELECT ekm_import_fernet_key('<key id>', '<Fernet key>' [, created_at => ..., state => 'rotating' | 'retired'])".into()),
            ),
        }
    };
    let (key_id, fernet_key, state) = (
        not_null(key_id, "key_id"),
        not_null(fernet_key, "fernet_key"),
        not_null(state, "state"),
    );
    let created = created_at.map(|t| {
        let raw: i64 = t.into_inner();
        if raw == i64::MAX || raw == i64::MIN {
            raise_with(
                PgSqlErrorCode::ERRCODE_DATETIME_FIELD_OVERFLOW,
                "created_at must be a finite time".into(),
                Some("give the time the runbook created the key, or leave created_at out".into()),
            );
        }
        ts_to_chrono(t)
    });
    let r = import(&[(key_id, fernet_key, created, state)]).or_raise();
    r.into_iter().next().map(|(_, a)| a).unwrap_or_default()
}

/// Imports many keys in one transaction (all or none) from a JSON array of
/// the runbook's key rows, each with its key: `[{"key_id": ..., "key":
/// ..., "created_at": ..., "rotation_status": ...}, ...]`. A row the
/// runbook had `retired` is imported retired; every other is `rotating`.
#[pg_extern(volatile)]
fn ekm_import_fernet_keys(
    keys: pgrx::JsonB,
) -> TableIterator<'static, (name!(key_id, String), name!(action, String))> {
    crate::pg::redact::note_plaintext(); // the statement holds key material
    crate::pg::error::refuse_on_standby("import keys", "ekm_import_fernet_keys()");
    let bad = |why: &str| -> ! {
        raise_with(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("keys must be a JSON array of objects with key_id and key: {why}"),
            Some("e.g. [{\"key_id\": \"key_20250927_153045_b7c2\", \"key\": \"<Fernet key>\", \"created_at\": \"2025-09-27T15:30:45Z\", \"rotation_status\": \"rotating\"}]".into()),
        )
    };
    let Some(rows) = keys.0.as_array() else {
        bad("it is not an array")
    };
    let mut v = Vec::new();
    for (n, r) in rows.iter().enumerate() {
        let field = |f: &str| r.get(f).and_then(|x| x.as_str()).map(str::to_string);
        let Some(id) = field("key_id") else {
            bad(&format!("element {} has no key_id", n + 1))
        };
        let Some(key) = field("key") else {
            bad(&format!("element {} ({id}) has no key", n + 1))
        };
        let created = field("created_at").map(|t| {
            chrono::DateTime::parse_from_rfc3339(&t)
                .map(|d| d.with_timezone(&chrono::Utc))
                .or_else(|_| {
                    chrono::NaiveDate::parse_from_str(&t, "%Y-%m-%d")
                        .map(|d| d.and_hms_opt(0, 0, 0).expect("midnight").and_utc())
                })
                .unwrap_or_else(|_| {
                    bad(&format!(
                        "created_at of {id} is not an ISO 8601 date or time"
                    ))
                })
        });
        let state = match field("rotation_status").as_deref() {
            Some("retired") => "retired",
            _ => "rotating",
        };
        v.push((id, key, created, state.to_string()));
    }
    TableIterator::new(import(&v).or_raise())
}

type ImportRow = (
    String,
    String,
    Option<chrono::DateTime<chrono::Utc>>,
    String,
);

fn import(rows: &[ImportRow]) -> EkmResult<Vec<(String, String)>> {
    let (_, owner) = catalog::ekm_tables()?;
    // everything checked before anything is written
    let mut keys = Vec::new();
    for (id, text, created, state) in rows {
        // the arguments the wrong way round: the key must not be echoed as
        // an id in the errors below
        if FernetKey::decode(id).is_ok() {
            raise_with(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                "the key id given is a Fernet key".into(),
                Some("the key id comes first, then the key: ekm_import_fernet_key('<key id>', '<Fernet key>')".into()),
            );
        }
        if let Some(c) = created {
            use chrono::Datelike;
            if !(1..=9999).contains(&c.year()) {
                raise_with(
                    PgSqlErrorCode::ERRCODE_DATETIME_FIELD_OVERFLOW,
                    format!("created_at of key \"{id}\" is out of range (year {})", c.year()),
                    Some("give the time the runbook created the key (years 1 to 9999), or leave it out".into()),
                );
            }
        }
        if !valid_id(id) {
            raise_with(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("\"{id}\" is not a usable key id"),
                Some("key ids are 1 to 100 letters, digits, '_', '.' or '-', starting with a letter or digit (the runbook's ids look like key_20250927_153045_b7c2)".into()),
            );
        }
        if state != "rotating" && state != "retired" {
            raise_with(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("an imported key can be rotating or retired, not \"{state}\""),
                Some("imported keys only decrypt (ekm never writes Fernet): rotating, the default, or retired".into()),
            );
        }
        match FernetKey::decode(text) {
            Ok(k) => keys.push(k),
            Err(e) => raise_with(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!(
                    "the key given for \"{id}\" is not a Fernet key: {}",
                    match &e {
                        EkmError::FernetKeyInvalid(why) => why.to_string(),
                        other => other.to_string(),
                    }
                ),
                e.hint(),
            ),
        }
    }
    for (i, (id, ..)) in rows.iter().enumerate() {
        if rows[..i].iter().any(|r| &r.0 == id) {
            raise_with(
                PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
                format!("key id {id} is given twice"),
                None,
            );
        }
        if keys[..i].iter().any(|k| k[..] == keys[i][..]) {
            raise_with(
                PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
                format!("key {id} is the same key as another one given"),
                None,
            );
        }
    }
    let master = masterkey::load()?;
    let kcv = master.check_value().to_vec();
    let out = as_owner(owner, || -> EkmResult<Vec<(String, String)>> {
        crate::keys::lifecycle::lock_key_changes()?;
        // never mix master keys (as for ekm's own keys)
        if let Some(other) = spi::one::<Vec<u8>>(
            "SELECT master_kcv FROM ekm.key_material WHERE wrapped IS NOT NULL AND master_kcv <> $1 LIMIT 1",
            vec![kcv.clone().into()],
        )? {
            return Err(EkmError::MasterKeyRotationPending {
                previous: ekm_core::crypto::fingerprint_of(&other),
                configured: master.fingerprint(),
            });
        }
        // the same key under another id: compared unwrapped, in memory only
        let existing = catalog::load_fernet_keys(owner)?;
        let mut out = Vec::new();
        for ((id, _, created, state), key) in rows.iter().zip(&keys) {
            if let Some(kind) = spi::one::<String>(
                "SELECT kind FROM ekm.key WHERE key_id = $1",
                vec![id.clone().into()],
            )? {
                raise_with(
                    PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
                    if kind == "fernet" {
                        format!("Fernet key {id} is already imported")
                    } else {
                        format!("{id} is the id of an ekm key in this database")
                    },
                    Some(
                        "list the keys with SELECT key_id, kind, rotation_status FROM ekm.keys"
                            .into(),
                    ),
                );
            }
            for e in &existing {
                let Some(w) = &e.wrapped else { continue };
                let same = master
                    .unwrap_labeled(&KeyKind::Fernet.label(&e.id), &e.id, w, &e.kcv)
                    .map(|k| k[..] == key[..])
                    .unwrap_or(false);
                if same {
                    raise_with(
                        PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
                        format!("the key given for {id} is already imported as {}", e.id),
                        Some(format!("a key is imported once; bare tokens it made decrypt under {}, and FERNET_V2 values must name that id", e.id)),
                    );
                }
            }
            let wrapped = master.wrap_labeled(&KeyKind::Fernet.label(id), key)?;
            let at = chrono_to_ts(created.unwrap_or_else(chrono::Utc::now));
            spi::exec(
                "INSERT INTO ekm.key (key_id, kind, rotation_status, created_at, rotated_at, retired_at) \
                 VALUES ($1, 'fernet', $2, $3, now(), CASE WHEN $2 = 'retired' THEN pg_catalog.clock_timestamp() END)",
                vec![id.clone().into(), state.clone().into(), at.into()],
            )?;
            spi::exec(
                "INSERT INTO ekm.key_material (key_id, wrapped, master_kcv) VALUES ($1, $2, $3)",
                vec![id.clone().into(), wrapped.into(), kcv.clone().into()],
            )?;
            catalog::audit(
                "fernet_key_imported",
                Some(id),
                &catalog::json_object(&[
                    ("state", state),
                    (
                        "created_at",
                        &created.map(|c| c.to_rfc3339()).unwrap_or_default(),
                    ),
                    (
                        "master_key_source",
                        &masterkey::describe(&gucs::master_key_source()),
                    ),
                ]),
            )?;
            out.push((id.clone(), format!("imported Fernet key {id} ({state})")));
        }
        Ok(out)
    })?;
    keycache::invalidate_all();
    Ok(out)
}

/// When a Fernet value's token was made (from its header, which is not
/// authenticated until the value is decrypted): for audits. NULL for a
/// value that is not Fernet.
#[pg_extern(immutable, strict, parallel_safe)]
fn ekm_fernet_token_time(value: &str) -> Option<TimestampWithTimeZone> {
    let fv = fernet::parse(value.as_bytes())?;
    let secs = fernet::token_time(fv.token()).or_raise();
    let t = chrono::DateTime::from_timestamp(secs.min(i64::MAX as u64 / 1_000_000) as i64, 0)
        .unwrap_or_default();
    Some(chrono_to_ts(t))
}
