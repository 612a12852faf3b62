//! Operations from the runbook: rollback, cleanup of old keys, health,
//! keys needing rotation, and in-place encryption of a plaintext column.

use crate::api::{activate, chrono_to_ts};
use crate::catalog::{self, as_owner};
use crate::error::{raise_with, OrRaise};
use crate::rotation::{
    check_batch_size, lock_key_changes, refuse_on_standby, start_job, supersede_unfinished,
};
use crate::scan;
use crate::{gucs, keycache, masterkey, worker};
use ekm_core::lifecycle::NONCE_BOUND;
use ekm_core::EkmError;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;

type EkmResult<T> = ekm_core::Result<T>;

fn internal(e: impl std::fmt::Display) -> EkmError {
    EkmError::Internal(e.to_string())
}

// ---------------------------------------------------------------- rollback

/// The runbook's Emergency Rollback: the previous key becomes active again
/// and a background job moves the data back to it.
#[pg_extern(volatile)]
fn ekm_rollback(
    batch_size: default!(i32, 1000),
) -> TableIterator<
    'static,
    (
        name!(job_id, i64),
        name!(from_key, String),
        name!(to_key, String),
        name!(note, String),
    ),
> {
    check_batch_size(batch_size);
    refuse_on_standby("roll keys back", "ekm_rollback()");
    let (_, owner) = catalog::ekm_tables().or_raise();
    let (job, from, to, note) = as_owner(owner, || -> EkmResult<(i64, String, String, String)> {
        lock_key_changes()?;
        // A running job is refused; an interrupted (cancelled) one is what a
        // rollback is for, so it is superseded.
        supersede_unfinished(true, "a rollback")?;
        let active = catalog::one::<String>(
            "SELECT key_id FROM ekm.key WHERE rotation_status = 'active'",
            vec![],
        )?
        .ok_or(EkmError::NoActiveKey)?;
        let prev = catalog::two::<String, String>(
            "SELECT k.key_id, k.rotation_status FROM ekm.key k \
             WHERE k.key_id <> $1 AND k.activated_at IS NOT NULL \
             ORDER BY k.activated_at DESC, k.key_id DESC",
            vec![active.clone().into()],
        )?;
        let (Some(prev), Some(state)) = prev else {
            raise_with(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("there is no previous key to roll back to: {active} is the only key that was ever active"),
                None,
            );
        };
        let has_material = catalog::one::<bool>(
            "SELECT wrapped IS NOT NULL FROM ekm.key_material WHERE key_id = $1",
            vec![prev.clone().into()],
        )?
        .unwrap_or(false);
        if state == "destroyed" || !has_material {
            raise_with(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("the previous key {prev} was destroyed: its material is erased, so nothing can move back to it"),
                Some(format!("{active} stays active; values on {prev} can only come back from a backup taken before it was destroyed")),
            );
        }
        if catalog::one::<i64>("SELECT count(*) FROM ekm.registered_column", vec![])?.unwrap_or(0) == 0 {
            raise_with(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "no column is registered, so a rollback could not move any data back".into(),
                Some(format!("register the encrypted columns first, or make {prev} active with SELECT ekm_activate_key('{prev}')")),
            );
        }
        activate(&prev)?;
        let job = start_job(
            "rollback",
            Some(&active),
            &prev,
            batch_size,
            &catalog::acting_role_name(),
            None,
            &[("previous_state", &state)],
        )?;
        let (_, age, _) = crate::rotation::active_key_age()?;
        let mut note = format!("new writes use {prev}; the data moves back from {active}");
        if age.needs_rotation {
            note.push_str(&format!(
                "; {prev} is {} days old and due for rotation: plan a new ekm_rotate()",
                age.age_days
            ));
        }
        Ok((job, active, prev, note))
    })
    .or_raise();
    worker::launch_or_warn(job);
    TableIterator::once((job, from, to, note))
}

// ----------------------------------------------------------------- cleanup

/// Destroys (erases the material of) keys retired more than `days` ago that
/// no registered column still uses and the latest scan of the database found
/// nowhere; with `dry_run`, only reports. (Its C symbol is new in 0.2.0:
/// the 0.1.0 definition, with one argument less, must never reach it.)
#[pg_extern(volatile, name = "ekm_cleanup_old_keys")]
fn ekm_cleanup_old_keys_v2(
    days: default!(i32, 365),
    dry_run: default!(bool, false),
    force: default!(bool, false),
) -> TableIterator<
    'static,
    (
        name!(key_id, String),
        name!(retired_at, Option<TimestampWithTimeZone>),
        name!(values_in_use, i64),
        name!(action, String),
    ),
> {
    if days < 0 {
        raise_with(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("days must be 0 or more, not {days}"),
            Some("days is how long a key must have been retired before it is destroyed; 0 takes every retired key the checks allow".into()),
        );
    }
    if !dry_run {
        refuse_on_standby("destroy keys", "ekm_cleanup_old_keys()");
    }
    let (_, owner) = catalog::ekm_tables().or_raise();
    let rows = as_owner(owner, || cleanup(days, dry_run, force)).or_raise();
    if !dry_run && rows.iter().any(|r| r.3 == "destroyed") {
        keycache::invalidate_all();
    }
    TableIterator::new(rows)
}

type CleanupRow = (String, Option<TimestampWithTimeZone>, i64, String);

fn cleanup(days: i32, dry_run: bool, force: bool) -> EkmResult<Vec<CleanupRow>> {
    lock_key_changes()?;
    if !dry_run {
        // partitions dropped since are no longer there to count
        crate::rotation::sync_partitions()?;
    }
    // The candidates, locked: no activation can take them while we count.
    let candidates = Spi::connect_mut(|c| -> pgrx::spi::SpiResult<Vec<(String, Option<TimestampWithTimeZone>, bool)>> {
        let mut v = Vec::new();
        for r in c.update(
            "SELECT key_id, retired_at, kind = 'fernet' FROM ekm.key WHERE rotation_status = 'retired' \
               AND coalesce(retired_at, rotated_at, created_at) < now() - make_interval(days => $1) \
             ORDER BY key_id FOR UPDATE",
            None,
            &[days.into()],
        )? {
            v.push((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<TimestampWithTimeZone>(2)?,
                r.get::<bool>(3)?.unwrap_or(false),
            ));
        }
        Ok(v)
    })
    .map_err(internal)?;
    let fernet: Vec<bool> = candidates.iter().map(|c| c.2).collect();
    let candidates: Vec<(String, Option<TimestampWithTimeZone>)> =
        candidates.into_iter().map(|(id, at, _)| (id, at)).collect();
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    // Checked by counting, in this transaction: values on each candidate in
    // every registered column.
    let ids: Vec<String> = candidates.iter().map(|c| c.0.clone()).collect();
    let mut in_use = vec![0i64; ids.len()];
    let cols = registered_columns()?;
    // As each table's owner (security-restricted), whatever the caller may
    // read: these are counts that keep a key alive, not data for the caller.
    for (tbl, col, _, exists) in &cols {
        if !exists {
            continue;
        }
        let t = match scan::readable(*tbl, col, false)? {
            Ok(t) => t,
            Err(_) => continue, // gone meanwhile: refused below
        };
        let n = scan::census(&t, &[(col.clone(), String::new())], false)?
            .pop()
            .unwrap_or_default();
        for (k, (_, count)) in &n.by_key {
            if let Some(i) = ids.iter().position(|x| *x == k.to_string()) {
                in_use[i] += count;
            }
        }
        // Fernet values on a retired imported key: a FERNET_V2 value names
        // it; a bare token that no key still decrypting authenticates may be
        // on any of them (a retired key's material is not unwrapped to tell)
        for (k, count) in &n.fernet_named {
            if let Some(i) = ids.iter().position(|x| x == k) {
                in_use[i] += count;
            }
        }
        for (i, is_fernet) in fernet.iter().enumerate() {
            if *is_fernet {
                in_use[i] += n.fernet_bare_unattributed;
            }
        }
    }
    if cols.iter().any(|c| !c.3) {
        raise_with(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "a registered column no longer exists, so ekm cannot check that no value uses the keys to destroy".into(),
            Some("see SELECT * FROM ekm_health() and unregister the column with ekm_unregister_column".into()),
        );
    }
    let mut out = Vec::new();
    for ((id, retired_at), n) in candidates.into_iter().zip(in_use) {
        // Registered columns are not the whole database: a copy in another
        // column, an audit table, a materialized view would be lost with
        // the key. A scan of the database (ekm_scan_database) that started
        // after the key was retired must have found none of it.
        let unscanned = if n > 0 { None } else { scan_verdict(&id)? };
        let action = if n > 0 {
            if !dry_run {
                pgrx::warning!(
                    "ekm: key {id} is kept: {n} values in registered columns still use it"
                );
            }
            format!("kept: {n} values in registered columns still use it")
        } else if unscanned.is_some() && !force {
            let why = unscanned.expect("some");
            if !dry_run {
                pgrx::warning!("ekm: key {id} is kept: {why}");
            }
            format!("kept: {why}")
        } else if dry_run {
            match unscanned {
                Some(why) => format!("would destroy (forced: {why})"),
                None => "would destroy".to_string(),
            }
        } else {
            if let Some(why) = &unscanned {
                pgrx::warning!("ekm: key {id} is destroyed with force => true although {why}");
                catalog::audit(
                    "key_destroy_forced",
                    Some(&id),
                    &catalog::json_object(&[("reason", why)]),
                )?;
            }
            catalog::exec(
                "UPDATE ekm.key_material SET wrapped = NULL WHERE key_id = $1",
                vec![id.clone().into()],
            )?;
            catalog::exec(
                "UPDATE ekm.key SET rotation_status = 'destroyed', destroyed_at = now() WHERE key_id = $1",
                vec![id.clone().into()],
            )?;
            catalog::audit(
                "key_material_erased",
                Some(&id),
                &catalog::json_object(&[
                    ("retired_more_than_days", &days.to_string()),
                    ("values_in_registered_columns", "0"),
                ]),
            )?;
            "destroyed".to_string()
        };
        out.push((id, retired_at, n, action));
    }
    Ok(out)
}

/// Why a key no registered column uses must not be destroyed yet, from the
/// scans of the database: none started after it was retired, or the latest
/// such scan found values on it (and where). None: the scan found none.
fn scan_verdict(key_id: &str) -> EkmResult<Option<String>> {
    let (scan, at) = catalog::two::<i64, String>(
        "SELECT j.job_id, to_char(j.finished_at, 'YYYY-MM-DD HH24:MI:SS TZ') FROM ekm.rotation_job j, ekm.key k \
         WHERE k.key_id = $1 AND j.kind = 'scan' AND j.state = 'done' \
           AND j.switched_at > coalesce(k.retired_at, k.rotated_at, k.created_at) \
         ORDER BY j.job_id DESC LIMIT 1",
        vec![key_id.into()],
    )?;
    let Some(scan) = scan else {
        return Ok(Some(
            "no scan of the database has run since it was retired: SELECT ekm_scan_database(), then clean up".into(),
        ));
    };
    let found = catalog::one::<String>(
        "SELECT string_agg(s.tbl::text || '.' || pg_catalog.quote_ident(s.col) || ': ' || s.values, ', ' ORDER BY s.tbl::text, s.col) \
         FROM ekm.ciphertext_scan s WHERE s.job_id = $1 AND s.key_id = $2",
        vec![scan.into(), key_id.into()],
    )?;
    let at = at.unwrap_or_default();
    // Every reason, in one sentence each: values found; tables the scan
    // could not read (foreign tables, whose rows live on another server,
    // and tables whose owner may not read them); bare Fernet tokens it
    // could not attribute.
    let mut why: Vec<String> = Vec::new();
    if let Some(f) = found {
        why.push(format!(
            "the scan of the database finished {at} found values on it in {f} (register those columns and rotate, or delete the values)"
        ));
    }
    let (foreign, unreadable) = catalog::two::<String, String>(
        "SELECT string_agg(DISTINCT s.tbl::text, ', ') FILTER (WHERE s.key_id = $2), \
                string_agg(DISTINCT s.tbl::text, ', ') FILTER (WHERE s.key_id = $3) \
         FROM ekm.ciphertext_scan s WHERE s.job_id = $1",
        vec![
            scan.into(),
            crate::scan::NOT_SCANNED_FOREIGN.into(),
            crate::scan::NOT_SCANNED_UNREADABLE.into(),
        ],
    )?;
    if let Some(f) = foreign {
        why.push(format!(
            "the scan of the database finished {at} could not read the foreign tables {f} (their rows are stored on another server), which may hold values on it: \
             check them there, then clean up with force => true"
        ));
    }
    if let Some(f) = unreadable {
        why.push(format!(
            "the scan of the database finished {at} could not read {f} (the owner may not SELECT it; ekm reads tables as their owner), which may hold values on it: \
             grant the owner SELECT and scan again, or check them yourself and clean up with force => true"
        ));
    }
    // An imported Fernet key: bare tokens the scan could not attribute (no
    // imported key that may decrypt authenticates them) may be on it.
    let unattributed = catalog::one::<String>(
        "SELECT string_agg(s.tbl::text || '.' || pg_catalog.quote_ident(s.col) || ': ' || s.values, ', ' ORDER BY s.tbl::text, s.col) \
         FROM ekm.ciphertext_scan s WHERE s.job_id = $1 AND s.key_id = $2 \
           AND EXISTS (SELECT 1 FROM ekm.key k WHERE k.key_id = $3 AND k.kind = 'fernet')",
        vec![
            scan.into(),
            crate::fastpath::FERNET_UNATTRIBUTED.into(),
            key_id.into(),
        ],
    )?;
    if let Some(f) = unattributed {
        why.push(format!(
            "the scan of the database finished {at} found bare Fernet tokens that no imported key still decrypting authenticates, which may be on it, in {f} (register those columns and rotate while their key is rotating, or delete the values)"
        ));
    }
    Ok((!why.is_empty()).then(|| why.join("; ")))
}

/// Registered columns: (table oid, column, shown name, whether it exists as a text column).
fn registered_columns() -> EkmResult<Vec<(pg_sys::Oid, String, String, bool)>> {
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
    .map_err(internal)
}

// ------------------------------------------------------ keys needing rotation

/// The runbook's `get_keys_needing_rotation()`: active keys that are due,
/// with the reason.
#[pg_extern(stable)]
fn ekm_keys_needing_rotation() -> TableIterator<
    'static,
    (
        name!(key_id, String),
        name!(rotation_status, String),
        name!(age_days, i64),
        name!(expires_in_days, i64),
        name!(encryptions, i64),
        name!(rotation_due_at, TimestampWithTimeZone),
        name!(reason, String),
    ),
> {
    let (_, owner) = catalog::ekm_tables().or_raise();
    let (active, age, encryptions) = as_owner(owner, crate::rotation::active_key_age).or_raise();
    if !age.needs_rotation {
        return TableIterator::new(Vec::new());
    }
    let policy = gucs::policy();
    let now = chrono::Utc::now();
    let mut reasons = Vec::new();
    if age.expires_in_days < 0 || now >= age.expires_at {
        reasons.push("expired".to_string());
    } else if now >= age.due_at {
        reasons.push(format!(
            "age: {} days (due at {} days or when fewer than {} days remain)",
            age.age_days, policy.due_age_days, policy.warning_days
        ));
    }
    if encryptions as f64 >= policy.due_encryptions {
        reasons.push(format!(
            "encryptions: {encryptions} of the {} allowed before rotation",
            policy.due_encryptions as i64
        ));
    }
    TableIterator::once((
        active,
        "active".to_string(),
        age.age_days,
        age.expires_in_days,
        encryptions,
        chrono_to_ts(age.due_at),
        reasons.join("; "),
    ))
}

// ------------------------------------------------------------------ health

type HealthRow = (String, String, String);

fn row(check: &str, status: &str, detail: String) -> HealthRow {
    (check.to_string(), status.to_string(), detail)
}

/// The runbook's `check_encryption_health`: one row per check.
#[pg_extern(volatile)]
fn ekm_health() -> TableIterator<
    'static,
    (
        name!(check, String),
        name!(status, String),
        name!(detail, String),
    ),
> {
    TableIterator::new(health())
}

/// One line for cron and monitoring: `ok`, or the worst status and the
/// checks that have it (e.g. `failed: master_key, round_trip`).
#[pg_extern(volatile)]
fn ekm_health_status() -> String {
    let rows = health();
    for worst in ["failed", "warning"] {
        let names: Vec<&str> = rows
            .iter()
            .filter(|r| r.1 == worst)
            .map(|r| r.0.as_str())
            .collect();
        if !names.is_empty() {
            return format!("{worst}: {}", names.join(", "));
        }
    }
    "ok".into()
}

fn health() -> Vec<HealthRow> {
    let (_, owner) = catalog::ekm_tables().or_raise();
    as_owner(owner, || {
        let mut out = Vec::new();
        let mut push = |r: EkmResult<HealthRow>, name: &str| {
            out.push(r.unwrap_or_else(|e| row(name, "failed", e.to_string())));
        };
        push(check_master_key(owner), "master_key");
        let active = check_active_key();
        let one_active = active.as_ref().map(|r| r.1 == "ok").unwrap_or(false);
        push(active, "active_key");
        if one_active {
            push(check_key_age(), "key_age");
            push(check_encryptions(), "encryptions");
        }
        push(check_jobs(), "rotation_jobs");
        push(check_auto_rotation(), "auto_rotation");
        push(check_decrypt_keys(), "decrypt_keys");
        push(check_unregistered_ciphertexts(), "unregistered_ciphertexts");
        push(check_log_statement(), "log_statement");
        match registered_columns() {
            Ok(cols) => {
                let missing: Vec<&str> =
                    cols.iter().filter(|c| !c.3).map(|c| c.2.as_str()).collect();
                out.push(if cols.is_empty() {
                    row("registered_columns", "warning", "no column is registered: ekm_rotate() has nothing to keep current (SELECT ekm_register_column(...))".into())
                } else if missing.is_empty() {
                    row("registered_columns", "ok", format!("{} registered columns exist", cols.len()))
                } else {
                    row("registered_columns", "failed", format!(
                        "registered but missing (dropped, or no longer text): {}; unregister with SELECT ekm_unregister_column(table, column)",
                        missing.join(", ")
                    ))
                });
                let mut p = |r: EkmResult<HealthRow>| {
                    out.push(r.unwrap_or_else(|e| row("unusable_values", "failed", e.to_string())))
                };
                p(check_values(&cols));
            }
            Err(e) => push(Err(e), "registered_columns"),
        }
        let mut p = |r: EkmResult<HealthRow>| {
            out.push(r.unwrap_or_else(|e| row("round_trip", "failed", e.to_string())))
        };
        p(check_round_trip());
        out
    })
}

fn check_master_key(owner: pg_sys::Oid) -> EkmResult<HealthRow> {
    let source = masterkey::describe(&gucs::master_key_source());
    let master = masterkey::load()?;
    let previous = masterkey::load_previous();
    let keys = catalog::load_keys(owner)?;
    let (mut n, mut under_previous) = (0, 0);
    let mut bad = Vec::new();
    for k in &keys {
        let Some(w) = &k.wrapped else { continue };
        n += 1;
        match master.unwrap(&k.id, w, &k.kcv) {
            Ok(_) => {}
            Err(EkmError::MasterKeyMismatch { .. }) if matches!(&previous, Some(Ok(p)) if p.unwrap(&k.id, w, &k.kcv).is_ok()) => {
                under_previous += 1
            }
            Err(e) => bad.push(format!("{}: {e}", k.id)),
        }
    }
    // imported Fernet keys are wrapped the same way
    for k in catalog::load_fernet_keys(owner)? {
        let Some(w) = &k.wrapped else { continue };
        n += 1;
        match master.unwrap_fernet(&k.id, w, &k.kcv) {
            Ok(_) => {}
            Err(EkmError::MasterKeyMismatch { .. }) if matches!(&previous, Some(Ok(p)) if p.unwrap_fernet(&k.id, w, &k.kcv).is_ok()) => {
                under_previous += 1
            }
            Err(e) => bad.push(format!("{}: {e}", k.id)),
        }
    }
    let fp = master.fingerprint();
    Ok(if !bad.is_empty() {
        row("master_key", "failed", format!(
            "loaded from {source} (fingerprint {fp}), but {} of {n} keys do not unwrap under it: {}; configure the master key they were wrapped with",
            bad.len(),
            bad.join("; ")
        ))
    } else if under_previous > 0 {
        row("master_key", "warning", format!(
            "a master key rotation is under way: {under_previous} of {n} keys are still wrapped under the previous master key; SELECT * FROM ekm_rotate_master_key() re-wraps them under {source} (fingerprint {fp})"
        ))
    } else if let Some(p) = &previous {
        row("master_key", "warning", format!(
            "every key unwraps under {source} (fingerprint {fp}), but a previous master key is still configured{}: no key needs it; remove ekm.previous_master_key_command / ekm.previous_master_key_file once every server (standbys too) has the new key",
            match p { Ok(p) => format!(" (fingerprint {})", p.fingerprint()), Err(_) => " (and cannot be loaded)".into() }
        ))
    } else if gucs::master_key_source() == gucs::MasterKeySource::DevDefault {
        row("master_key", "warning", format!(
            "the DEVELOPMENT DEFAULT key ({source}, fingerprint {fp}) unwraps all {n} keys with material, but it sits beside the data it protects and base backups copy it: set ekm.master_key_command or ekm.master_key_file"
        ))
    } else {
        row(
            "master_key",
            "ok",
            format!("loaded from {source} (fingerprint {fp}); unwraps all {n} keys with material"),
        )
    })
}

fn check_active_key() -> EkmResult<HealthRow> {
    let ids = Spi::connect(|c| -> pgrx::spi::SpiResult<Vec<String>> {
        let mut v = Vec::new();
        for r in c.select(
            "SELECT key_id FROM ekm.key WHERE rotation_status = 'active' ORDER BY 1",
            None,
            &[],
        )? {
            v.push(r.get::<String>(1)?.unwrap_or_default());
        }
        Ok(v)
    })
    .map_err(internal)?;
    Ok(match ids.len() {
        1 => row(
            "active_key",
            "ok",
            format!("{} is the one active key", ids[0]),
        ),
        0 => row(
            "active_key",
            "failed",
            "no key is active: nothing can be encrypted; SELECT ekm_activate_key(key_id)".into(),
        ),
        n => row(
            "active_key",
            "failed",
            format!("{n} keys are active: {}", ids.join(", ")),
        ),
    })
}

fn check_key_age() -> EkmResult<HealthRow> {
    let (active, age, _) = crate::rotation::active_key_age()?;
    let now = chrono::Utc::now();
    let due = age.due_at.format("%Y-%m-%d");
    Ok(if now >= age.expires_at {
        row(
            "key_age",
            "failed",
            format!(
                "{active} expired on {} ({} days old): SELECT ekm_rotate()",
                age.expires_at.format("%Y-%m-%d"),
                age.age_days
            ),
        )
    } else if now >= age.due_at {
        row("key_age", "warning", format!(
            "{active} is {} days old, due for rotation since {due}, expires in {} days: SELECT ekm_rotate()",
            age.age_days, age.expires_in_days
        ))
    } else {
        row(
            "key_age",
            "ok",
            format!(
                "{active} is {} days old; rotation due {due}; expires in {} days",
                age.age_days, age.expires_in_days
            ),
        )
    })
}

fn check_encryptions() -> EkmResult<HealthRow> {
    let (active, _, n) = crate::rotation::active_key_age()?;
    let due = gucs::policy().due_encryptions;
    let pct = 100.0 * n as f64 / NONCE_BOUND;
    let detail =
        format!("{active} encrypted {n} values ({pct:.4}% of the 2^32 random-nonce bound)");
    Ok(if n as f64 >= NONCE_BOUND {
        row("encryptions", "failed", format!("{detail}: rotate now"))
    } else if n as f64 >= due {
        row(
            "encryptions",
            "warning",
            format!("{detail}: above ekm.rotation_due_encryptions, rotation is due"),
        )
    } else {
        row("encryptions", "ok", detail)
    })
}

fn check_jobs() -> EkmResult<HealthRow> {
    // A worker holds its job's lock (src/locks.rs).
    let r = catalog::three::<i64, String, bool>(
        &format!(
            "SELECT j.job_id, j.state, EXISTS (SELECT 1 FROM pg_catalog.pg_locks l \
                     WHERE {} AND l.granted AND l.objid = (j.job_id % 4294967296)::oid) \
             FROM ekm.rotation_job j WHERE j.state IN ('running', 'cancelled', 'needs_attention') AND j.kind <> 'scan'",
            crate::locks::job_locks_filter()
        ),
        vec![],
    )?;
    if let (Some(j), Some(state), Some(alive)) = r {
        return Ok(if state == "needs_attention" {
            let n = catalog::one::<i64>(
                "SELECT count(*) FROM ekm.rotation_problem_row WHERE job_id = $1",
                vec![j.into()],
            )?
            .unwrap_or(0);
            row("rotation_jobs", "failed", format!(
                "job {j} needs attention: {n} values could not be moved and the old keys stay rotating (SELECT * FROM ekm.rotation_problem WHERE job_id = {j}); fix them, then SELECT ekm_rotation_resume({j})"
            ))
        } else if state == "cancelled" {
            row("rotation_jobs", "warning", format!(
                "job {j} was cancelled before it finished; values stay decryptable: SELECT ekm_rotation_resume({j})"
            ))
        } else if alive {
            let waiting = catalog::one::<String>(
                "SELECT waiting_for FROM ekm.rotation_job WHERE job_id = $1",
                vec![j.into()],
            )?;
            row(
                "rotation_jobs",
                "ok",
                match waiting {
                    Some(w) => format!("job {j} is running; waiting for {w}"),
                    None => format!("job {j} is running (SELECT * FROM ekm.rotation_progress)"),
                },
            )
        } else {
            row("rotation_jobs", "failed", format!(
                "job {j} is running but no worker is working on it (stuck): SELECT ekm_rotation_resume({j})"
            ))
        });
    }
    let (j, err) = catalog::two::<i64, String>(
        "SELECT j.job_id, coalesce(j.error, '') FROM ekm.rotation_job j \
         WHERE j.job_id = (SELECT max(job_id) FROM ekm.rotation_job) AND j.state = 'failed' \
           AND EXISTS (SELECT 1 FROM ekm.key k WHERE k.rotation_status = 'rotating')",
        vec![],
    )?;
    if let Some(j) = j {
        return Ok(row(
            "rotation_jobs",
            "warning",
            format!(
                "job {j} failed ({}) and keys are still rotating: SELECT ekm_rotation_resume({j})",
                err.unwrap_or_default()
            ),
        ));
    }
    let rotating = catalog::one::<i64>(
        "SELECT count(*) FROM ekm.key WHERE rotation_status = 'rotating'",
        vec![],
    )?
    .unwrap_or(0);
    Ok(if rotating > 0 {
        row("rotation_jobs", "warning", format!(
            "{rotating} keys are rotating but no job moves their data: SELECT ekm_rotate(force => true)"
        ))
    } else {
        row("rotation_jobs", "ok", "no job is unfinished".into())
    })
}

fn check_auto_rotation() -> EkmResult<HealthRow> {
    if !gucs::auto_rotate() {
        return Ok(row(
            "auto_rotation",
            "ok",
            "off (ekm.auto_rotate): rotations start with SELECT ekm_rotate()".into(),
        ));
    }
    let db = catalog::one::<String>("SELECT current_database()::text", vec![])?.unwrap_or_default();
    if !gucs::auto_rotate_databases().contains(&db) {
        return Ok(row(
            "auto_rotation",
            "ok",
            format!("ekm.auto_rotate is on, but {db} is not listed in ekm.auto_rotate_databases"),
        ));
    }
    Ok(match crate::rotation::last_rollback_job()? {
        Some(j) => row("auto_rotation", "warning", format!(
            "paused since rollback job {j}: automatic rotation resumes after the next manual SELECT ekm_rotate()"
        )),
        None => row("auto_rotation", "ok", format!(
            "on: the active key is rotated when due (checked every {} s)",
            gucs::auto_rotate_naptime().as_secs()
        )),
    })
}

/// From the latest finished scan of the database: ekm ciphertexts in
/// columns that are not registered (a rotation does not move them, and
/// once their key is destroyed they are lost).
fn check_unregistered_ciphertexts() -> EkmResult<HealthRow> {
    let (scan, at) = catalog::two::<i64, String>(
        "SELECT job_id, to_char(finished_at, 'YYYY-MM-DD HH24:MI:SS TZ') FROM ekm.rotation_job \
         WHERE kind = 'scan' AND state = 'done' ORDER BY job_id DESC LIMIT 1",
        vec![],
    )?;
    let Some(scan) = scan else {
        return Ok(row(
            "unregistered_ciphertexts",
            "ok",
            "no scan of the database yet: SELECT ekm_scan_database() finds ekm ciphertexts in every column".into(),
        ));
    };
    let at = at.unwrap_or_default();
    let found = catalog::one::<String>(
        "SELECT string_agg(t || ': ' || n || ' values', ', ' ORDER BY t) FROM \
           (SELECT s.tbl::text || '.' || pg_catalog.quote_ident(s.col) AS t, sum(s.values) AS n FROM ekm.ciphertext_scan s \
            WHERE s.job_id = $1 AND s.key_id NOT LIKE 'not scanned: %' AND NOT EXISTS (SELECT 1 FROM ekm.registered_column r WHERE r.tbl = s.tbl AND r.col = s.col) \
            GROUP BY 1) u",
        vec![scan.into()],
    )?;
    let unscanned = catalog::one::<String>(
        "SELECT string_agg(DISTINCT s.tbl::text || ' (' || s.key_id || ')', ', ') FROM ekm.ciphertext_scan s \
         WHERE s.job_id = $1 AND s.key_id LIKE 'not scanned: %'",
        vec![scan.into()],
    )?;
    if let (None, Some(f)) = (&found, unscanned) {
        return Ok(row("unregistered_ciphertexts", "warning", format!(
            "the scan of {at} could not read {f}; cleanup keeps retired keys until they are checked (then force => true)"
        )));
    }
    Ok(match found {
        Some(f) => row("unregistered_ciphertexts", "warning", format!(
            "the scan of {at} found ekm ciphertexts in columns that are not registered: {f}; rotations do not move them and cleanup keeps their keys: register them (ekm_register_column) or remove the copies"
        )),
        None => row(
            "unregistered_ciphertexts",
            "ok",
            format!("the scan of {at} found ekm ciphertexts only in registered columns"),
        ),
    })
}

/// `log_statement = 'all'` (or 'mod') logs every statement's text before it
/// runs: ekm redacts those that name its functions, but a statement that
/// passes plaintext to a function calling ekm internally is logged as is.
fn check_log_statement() -> EkmResult<HealthRow> {
    let (setting, registered) = catalog::two::<String, i64>(
        "SELECT pg_catalog.current_setting('log_statement'), (SELECT count(*) FROM ekm.registered_column)",
        vec![],
    )?;
    let setting = setting.unwrap_or_default();
    // pg_stat_statements keeps the text of utility statements as it was
    // written (ALTER SYSTEM SET ekm.master_key_command = '...'), out of
    // ekm's reach; it replaces the constants of other statements.
    let pgss = catalog::one::<bool>(
        "SELECT pg_catalog.current_setting('pg_stat_statements.track_utility', true) IS NOT NULL \
                AND pg_catalog.current_setting('pg_stat_statements.track_utility', true) OPERATOR(pg_catalog.=) 'on'",
        vec![],
    )?
    .unwrap_or(false);
    if pgss {
        return Ok(row("log_statement", "warning",
            "pg_stat_statements is loaded with pg_stat_statements.track_utility = on: it keeps the text of utility statements as written, \
             so ALTER SYSTEM SET ekm.master_key_command = '...' (and its value) stays in pg_stat_statements; \
             set pg_stat_statements.track_utility = off, or configure the master key in postgresql.conf by hand".into()));
    }
    Ok(
        if matches!(setting.as_str(), "all" | "mod") && registered.unwrap_or(0) > 0 {
            row("log_statement", "warning", format!(
                "log_statement = '{setting}' writes statements to the server log before they run: ekm leaves out those that name its functions, not those that pass plaintext on through a function of their own; set log_statement = 'ddl' or 'none' in a database with encrypted columns"
            ))
        } else {
            row(
                "log_statement",
                "ok",
                format!(
                    "log_statement = '{setting}'; ekm.log_redaction = {}",
                    if gucs::log_redaction() { "on" } else { "off" }
                ),
            )
        },
    )
}

fn check_decrypt_keys() -> EkmResult<HealthRow> {
    let n = catalog::one::<i64>(
        "SELECT count(*) FROM ekm.key WHERE rotation_status IN ('active', 'rotating')",
        vec![],
    )?
    .unwrap_or(0);
    Ok(if n > 5 {
        row("decrypt_keys", "warning", format!(
            "{n} keys can decrypt (more than 5): finish the rotations, then SELECT * FROM ekm_cleanup_old_keys(dry_run => true)"
        ))
    } else {
        row("decrypt_keys", "ok", format!("{n} keys can decrypt"))
    })
}

fn check_values(cols: &[(pg_sys::Oid, String, String, bool)]) -> EkmResult<HealthRow> {
    let mut bad = Vec::new();
    let mut unchecked = Vec::new();
    let mut scanned = 0;
    for (tbl, col, name, exists) in cols {
        if !exists {
            continue;
        }
        // read as the table's owner, for a caller who may read the column
        let t = match scan::readable(*tbl, col, true)? {
            Ok(t) => t,
            Err(why) => {
                unchecked.push(format!("{name} ({why})"));
                continue;
            }
        };
        scanned += 1;
        let context = catalog::one::<String>(
            "SELECT context FROM ekm.registered_column WHERE tbl = $1::regclass AND col = $2",
            vec![(*tbl).into(), col.clone().into()],
        )?
        .unwrap_or_default();
        // values on keys that cannot decrypt, and values that do not decrypt
        // with the column's registered context (a rotation would stop at them)
        let n = scan::census(&t, &[(col.clone(), context)], true)?
            .pop()
            .unwrap_or_default();
        let mut counts = Vec::new();
        for class in [
            "created",
            "destroyed",
            "malformed",
            "retired",
            "unknown",
            "fernet_undecryptable",
        ] {
            let c = n.count(&[class]);
            if c > 0 {
                counts.push(match class {
                    "malformed" => format!("{c} malformed"),
                    "fernet_undecryptable" => format!("{c} Fernet values no imported key decrypts"),
                    _ => format!("{c} on {class} keys"),
                });
            }
        }
        if n.wrong_context > 0 {
            counts.push(format!(
                "{} not decrypting with the registered context",
                n.wrong_context
            ));
        }
        if !counts.is_empty() {
            bad.push(format!("{name}: {}", counts.join(", ")));
        }
    }
    let not_checked = if unchecked.is_empty() {
        String::new()
    } else {
        format!("; not checked: {}", unchecked.join("; "))
    };
    Ok(if !bad.is_empty() {
        row("unusable_values", "failed", format!(
            "values that cannot be decrypted: {}; find them with SELECT ekm_key_id(col) ... and see docs/runbook.md, troubleshooting{not_checked}",
            bad.join("; ")
        ))
    } else if !unchecked.is_empty() {
        row(
            "unusable_values",
            "warning",
            format!("every value in {scanned} registered columns is on a key that decrypts{not_checked}"),
        )
    } else {
        row(
            "unusable_values",
            "ok",
            format!("every value in {scanned} registered columns is on a key that decrypts"),
        )
    })
}

fn check_round_trip() -> EkmResult<HealthRow> {
    const PROBE: &[u8] = b"ekm health check";
    let ctx = b"ekm.health";
    let ct = keycache::with_encrypt_key(|k, n| k.seal(n, PROBE, ctx))?;
    let key = ekm_core::format::key_of(&ct)?;
    let back = keycache::with_decrypt_key(&key.to_ref(), |k| k.open(&ct, ctx))?;
    Ok(if back.as_slice() == PROBE {
        row(
            "round_trip",
            "ok",
            format!("encrypted and decrypted a probe with {key}"),
        )
    } else {
        row(
            "round_trip",
            "failed",
            "a probe did not decrypt to what was encrypted".into(),
        )
    })
}

// ------------------------------------------------------ scan the database

/// Starts a background job that reads every text-like column (text,
/// varchar, char, json, jsonb, arrays and domains of them) of every table
/// and materialized view of the database, as each table's owner, and
/// records the ekm ciphertexts it finds per table, column and key
/// (ekm.ciphertext_locations). Progress, wait, cancel and resume as for a
/// rotation; it runs beside one.
#[pg_extern(volatile)]
fn ekm_scan_database(
    batch_size: default!(i32, 1000),
) -> TableIterator<
    'static,
    (
        name!(job_id, i64),
        name!(tables, i64),
        name!(columns, i64),
        name!(note, String),
    ),
> {
    check_batch_size(batch_size);
    refuse_on_standby("scan the database", "ekm_scan_database()");
    let (_, owner) = catalog::ekm_tables().or_raise();
    let (job, tables, columns, foreign) = as_owner(owner, || -> EkmResult<(i64, i64, i64, i64)> {
        // Serialized with key changes: a key imported (retired) by a
        // transaction still open when this one starts could otherwise be
        // missed by the scan (its Fernet values are only recognised once
        // imported) while the scan, started after the key's retired_at,
        // still counted for cleanup's guard. The job's switched_at
        // (clock_timestamp()) is taken after the lock.
        crate::rotation::lock_key_changes()?;
        let (running, state) = catalog::two::<i64, String>(
            "SELECT job_id, state FROM ekm.rotation_job WHERE kind = 'scan' AND state IN ('running', 'cancelled')",
            vec![],
        )?;
        if let (Some(j), Some(state)) = (running, state) {
            if state == "running" {
                raise_with(
                    PgSqlErrorCode::ERRCODE_OBJECT_IN_USE,
                    format!("a scan of the database is already running (job {j})"),
                    Some(format!("follow it with SELECT * FROM ekm_rotation_wait({j})")),
                );
            }
            catalog::exec(
                "UPDATE ekm.rotation_job SET state = 'failed', error = 'superseded by a new scan', finished_at = now() WHERE job_id = $1",
                vec![j.into()],
            )?;
        }
        let active = catalog::one::<String>(
            "SELECT key_id FROM ekm.key WHERE rotation_status = 'active'",
            vec![],
        )?
        .ok_or(EkmError::NoActiveKey)?;
        let job = catalog::one_mut::<i64>(
            "INSERT INTO ekm.rotation_job (kind, to_key, batch_size, requested_by) VALUES ('scan', $1, $2, $3) RETURNING job_id",
            vec![active.into(), batch_size.into(), catalog::acting_role_name().into()],
        )?
        .expect("returning");
        // Foreign tables store their rows on another server: they are not
        // read, but recorded as not scanned (cleanup keeps keys for them).
        let (tables, columns, foreign) = catalog::three::<i64, i64, i64>(
            "WITH tt AS (SELECT t::oid AS oid FROM unnest(ARRAY['pg_catalog.text', 'pg_catalog.varchar', 'pg_catalog.bpchar', \
                                                                'pg_catalog.json', 'pg_catalog.jsonb']::pg_catalog.regtype[]) t), \
                  types AS (SELECT oid FROM tt \
                            UNION SELECT typarray FROM pg_catalog.pg_type WHERE oid IN (SELECT oid FROM tt) \
                            UNION SELECT oid FROM pg_catalog.pg_type WHERE typtype = 'd' AND typbasetype IN (SELECT oid FROM tt)), \
                  cols AS (SELECT c.oid, c.relkind, c.reltuples, c.relpages, a.attname, \
                           pg_catalog.has_column_privilege(c.relowner, c.oid, a.attname, 'SELECT') \
                             AND pg_catalog.has_column_privilege(c.relowner, c.oid, 'ctid', 'SELECT') AS owner_reads \
                    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                    JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid \
                    WHERE c.relkind IN ('r', 'm') AND c.relpersistence <> 't' AND (c.relkind <> 'm' OR c.relispopulated) \
                      AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'ekm') AND n.nspname NOT LIKE 'pg\\_toast%' \
                      AND a.attnum > 0 AND NOT a.attisdropped AND a.atttypid IN (SELECT oid FROM types)), \
                  ins AS (INSERT INTO ekm.rotation_cursor (job_id, tbl, col, context, blocks_total, blocks_per_batch, rows_total) \
                    SELECT $1, c.oid::regclass, c.attname, '', pg_relation_size(c.oid) / current_setting('block_size')::bigint, \
                           CASE WHEN c.reltuples <= 0 THEN 1 \
                                ELSE greatest(1, ($2::float8 / greatest(1.0, c.reltuples / greatest(c.relpages, 1)))::int) END, \
                           greatest(c.reltuples, 0)::bigint \
                    FROM cols c WHERE c.owner_reads \
                    RETURNING tbl), \
                  unreadable AS (INSERT INTO ekm.ciphertext_scan (job_id, tbl, col, key_id, values) \
                    SELECT $1, c.oid::regclass, c.attname, $4, 0 FROM cols c WHERE NOT c.owner_reads \
                    RETURNING tbl), \
                  fdw AS (INSERT INTO ekm.ciphertext_scan (job_id, tbl, col, key_id, values) \
                    SELECT $1, c.oid::regclass, a.attname, $3, 0 \
                    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                    JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid \
                    WHERE c.relkind = 'f' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'ekm') \
                      AND a.attnum > 0 AND NOT a.attisdropped AND a.atttypid IN (SELECT oid FROM types) \
                    RETURNING tbl) \
             SELECT count(DISTINCT tbl), count(*), (SELECT count(DISTINCT tbl) FROM fdw) \
                    + (SELECT count(DISTINCT tbl) FROM unreadable) FROM ins",
            vec![
                job.into(),
                batch_size.into(),
                crate::scan::NOT_SCANNED_FOREIGN.into(),
                crate::scan::NOT_SCANNED_UNREADABLE.into(),
            ],
        )?;
        crate::rotation::size_batches(job, batch_size)?;
        let (tables, columns, foreign) = (tables.unwrap_or(0), columns.unwrap_or(0), foreign.unwrap_or(0));
        catalog::audit(
            "database_scan_started",
            None,
            &catalog::json_object(&[
                ("job_id", &job.to_string()),
                ("tables", &tables.to_string()),
                ("columns", &columns.to_string()),
                ("foreign_tables_not_scanned", &foreign.to_string()),
            ]),
        )?;
        Ok((job, tables, columns, foreign))
    })
    .or_raise();
    worker::launch_or_warn(job);
    let mut note = format!("scanning in the background: SELECT * FROM ekm_rotation_wait({job}), then SELECT * FROM ekm.ciphertext_locations");
    if foreign > 0 {
        note.push_str(&format!(
            "; {foreign} table(s) not scanned (foreign tables, whose rows are stored on another server, or tables whose owner may not read them: SELECT * FROM ekm.ciphertext_locations WHERE key_id LIKE 'not scanned%'): cleanup keeps retired keys until you have checked them"
        ));
    }
    TableIterator::once((job, tables, columns, note))
}

// ---------------------------------------------------- plaintext migration

type EncryptColumnRow = (
    Option<i64>,
    String,
    String,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<f64>,
    String,
);

#[pg_schema]
mod ekm {
    use super::*;

    /// The runbook's `migrate_secure_encryption`: encrypts a plaintext column in
    /// place in batches (background worker), skipping values already encrypted,
    /// and registers it. The dry run counts plaintext, encrypted and foreign values.
    #[pg_extern(volatile)]
    fn _ekm_encrypt_column(
        tbl: pg_sys::Oid,
        col: &str,
        batch_size: default!(i32, 1000),
        dry_run: default!(bool, false),
        context: default!(Option<&str>, "NULL"),
    ) -> TableIterator<
        'static,
        (
            name!(job_id, Option<i64>),
            name!(table_name, String),
            name!(column_name, String),
            name!(plaintext_values, Option<i64>),
            name!(encrypted_values, Option<i64>),
            name!(foreign_values, Option<i64>),
            name!(null_values, Option<i64>),
            name!(estimated_seconds, Option<f64>),
            name!(note, String),
        ),
    > {
        check_batch_size(batch_size);
        if !dry_run {
            refuse_on_standby("encrypt a column", "ekm_encrypt_column()");
        }
        TableIterator::once(encrypt_column(tbl, col, batch_size, dry_run, context).or_raise())
    }
}

fn encrypt_column(
    tbl: pg_sys::Oid,
    col: &str,
    batch_size: i32,
    dry_run: bool,
    context: Option<&str>,
) -> EkmResult<EncryptColumnRow> {
    // the name as the caller writes it (before the search_path changes)
    let name = catalog::display_name(tbl);
    catalog::with_safe_search_path(|| {
        encrypt_column_as_caller(tbl, col, batch_size, dry_run, context, name)
    })
}

fn encrypt_column_as_caller(
    tbl: pg_sys::Oid,
    col: &str,
    batch_size: i32,
    dry_run: bool,
    context: Option<&str>,
    name: String,
) -> EkmResult<EncryptColumnRow> {
    // Only ordinary and partitioned tables (42809 for a view, ...).
    let t = catalog::Table::require(tbl)?;
    let (_, owner) = catalog::ekm_tables()?;
    let registered = as_owner(owner, || {
        catalog::one::<String>(
            "SELECT context FROM ekm.registered_column WHERE tbl = $1::regclass AND col = $2",
            vec![tbl.into(), col.into()],
        )
    })?;
    let context = context
        .map(str::to_string)
        .or(registered)
        .unwrap_or_default();
    if dry_run {
        // Checks the column like registering would, without registering;
        // the caller must be allowed to read it.
        if scan::column_type(tbl, col)?.is_none() {
            raise_with(
                PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                format!("column \"{col}\" of {name} does not exist"),
                None,
            );
        }
        if !catalog::caller_may_read(tbl, col)? {
            raise_with(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("permission denied to read column \"{col}\" of {name}"),
                Some(format!(
                    "a dry run reads the column as its table's owner for a role that may read it: GRANT SELECT ({}) ON {name} TO {}",
                    catalog::quote_ident(col),
                    catalog::quote_ident(&catalog::acting_role_name())
                )),
            );
        }
        let census = scan::census(&t, &[(col.to_string(), context.clone())], true)?
            .pop()
            .unwrap_or_default();
        let fernet = census.count(&["fernet"]);
        let lost = census.count(&["fernet_undecryptable"]);
        let by_key = fernet_by_key(&census);
        let n = census;
        let (p, e, f, n, x) = (
            n.count(&["plaintext"]),
            n.count(&[
                "active",
                "rotating",
                "retired",
                "created",
                "destroyed",
                "unknown",
            ]),
            n.count(&["foreign", "malformed", "fernet_undecryptable"]),
            n.count(&["null"]),
            n.wrong_context,
        );
        let mut note = format!("dry run: {p} plaintext values would be encrypted");
        if fernet > 0 {
            note.push_str(&format!(
                "; {fernet} Fernet values would move onto the active key ({by_key})"
            ));
        }
        if lost > 0 {
            note.push_str(&format!(
                "; {lost} Fernet values no imported key decrypts are left as they are (ekm_rotate's check lists them in ekm.rotation_problem by row)"
            ));
        }
        if x > 0 {
            note.push_str(&format!(
                "; {x} encrypted values do not decrypt with the context '{context}' (encrypted with another context, or altered): a later rotation would stop at them"
            ));
        }
        if f > lost {
            note.push_str(&format!(
                "; {} values are another scheme's ciphertext (e.g. FERNET_V2 before its keys are imported) or malformed ekm values and are left as they are",
                f - lost
            ));
        }
        return Ok((
            None,
            name,
            col.to_string(),
            Some(p + fernet),
            Some(e),
            Some(f),
            Some(n),
            Some(p as f64 / crate::rotation::ESTIMATE_ROWS_PER_SECOND),
            note,
        ));
    }
    // Registering checks the column (exists, text, the caller may update it).
    crate::rotation::register_as_caller(tbl, col, &context, &name)?;
    let job = as_owner(owner, || -> EkmResult<i64> {
        lock_key_changes()?;
        supersede_unfinished(false, "a column encryption")?;
        let active = catalog::one::<String>(
            "SELECT key_id FROM ekm.key WHERE rotation_status = 'active'",
            vec![],
        )?
        .ok_or(EkmError::NoActiveKey)?;
        start_job(
            "encrypt",
            None,
            &active,
            batch_size,
            &catalog::acting_role_name(),
            Some((tbl, col)),
            &[("table", &name), ("column", col)],
        )
    })?;
    worker::launch_or_warn(job);
    Ok((
        Some(job),
        name,
        col.to_string(),
        None,
        None,
        None,
        None,
        None,
        format!("encrypting in the background: SELECT * FROM ekm.rotation_progress WHERE job_id = {job}, or SELECT ekm_rotation_wait({job})"),
    ))
}

/// "key_a: 3, key_b: 5": Fernet values per imported key, for notes.
pub(crate) fn fernet_by_key(n: &scan::Census) -> String {
    n.by_fernet_key
        .iter()
        .map(|(k, c)| format!("{k}: {c}"))
        .collect::<Vec<_>>()
        .join(", ")
}
