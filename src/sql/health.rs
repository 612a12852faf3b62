//! The runbook's checks: `ekm_health()` (one row per check, each with what
//! to do) and `ekm_health_status()` for cron, and the keys needing rotation.

use crate::jobs::scan::{self, registered_columns};
use crate::keys::{catalog, keycache, masterkey};
use crate::pg::error::{internal, OrRaise};
use crate::pg::gucs;
use crate::pg::owner::as_owner;
use crate::pg::spi;
use crate::pg::time::chrono_to_ts;
use ekm_core::lifecycle::NONCE_BOUND;
use ekm_core::EkmError;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;

type EkmResult<T> = ekm_core::Result<T>;

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
    let (active, age, encryptions) = as_owner(owner, crate::jobs::start::active_key_age).or_raise();
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
            // once for both checks (on a Citus coordinator it asks every
            // worker node for its count)
            let active = crate::jobs::start::active_key_age();
            push(active.clone().map(|a| check_key_age(&a)), "key_age");
            push(active.map(|a| check_encryptions(&a)), "encryptions");
        }
        push(check_jobs(), "rotation_jobs");
        push(check_auto_rotation(), "auto_rotation");
        push(check_decrypt_keys(), "decrypt_keys");
        push(check_unregistered_ciphertexts(), "unregistered_ciphertexts");
        push(check_log_statement(), "log_statement");
        if let Some(r) = check_citus_nodes().transpose() {
            push(r, "citus_nodes");
        }
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

fn check_key_age((active, age, _): &ActiveKeyAge) -> HealthRow {
    let now = chrono::Utc::now();
    let due = age.due_at.format("%Y-%m-%d");
    if now >= age.expires_at {
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
    }
}

fn check_encryptions((active, _, n): &ActiveKeyAge) -> HealthRow {
    let n = *n;
    let due = gucs::policy().due_encryptions;
    let pct = 100.0 * n as f64 / NONCE_BOUND;
    let detail =
        format!("{active} encrypted {n} values ({pct:.4}% of the 2^32 random-nonce bound)");
    if n as f64 >= NONCE_BOUND {
        row("encryptions", "failed", format!("{detail}: rotate now"))
    } else if n as f64 >= due {
        row(
            "encryptions",
            "warning",
            format!("{detail}: above ekm.rotation_due_encryptions, rotation is due"),
        )
    } else {
        row("encryptions", "ok", detail)
    }
}

/// The active key, its age against the policy, and its encryptions.
type ActiveKeyAge = (String, ekm_core::lifecycle::KeyAge, i64);

fn check_jobs() -> EkmResult<HealthRow> {
    // A worker holds its job's lock (src/locks.rs).
    // (a Citus worker node's verified part of the coordinator's job needs
    // no worker: it waits for the coordinator's retire)
    let r = spi::three::<i64, String, bool>(
        &format!(
            "SELECT j.job_id, j.state, j.verified_at IS NOT NULL OR EXISTS (SELECT 1 FROM pg_catalog.pg_locks l \
                     WHERE {} AND l.granted AND l.objid = (j.job_id % 4294967296)::oid) \
             FROM ekm.rotation_job j WHERE j.state IN ('running', 'cancelled', 'needs_attention') AND j.kind <> 'scan'",
            crate::keys::locks::job_locks_filter()
        ),
        vec![],
    )?;
    if let (Some(j), Some(state), Some(alive)) = r {
        return Ok(if state == "needs_attention" {
            let n = spi::one::<i64>(
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
            let waiting = spi::one::<String>(
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
    let (j, err) = spi::two::<i64, String>(
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
    let rotating = spi::one::<i64>(
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
    let db = spi::one::<String>("SELECT current_database()::text", vec![])?.unwrap_or_default();
    if !gucs::auto_rotate_databases().contains(&db) {
        return Ok(row(
            "auto_rotation",
            "ok",
            format!("ekm.auto_rotate is on, but {db} is not listed in ekm.auto_rotate_databases"),
        ));
    }
    Ok(match crate::jobs::start::last_rollback_job()? {
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
    let (scan, at) = spi::two::<i64, String>(
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
    let found = spi::one::<String>(
        "SELECT string_agg(t || ': ' || n || ' values', ', ' ORDER BY t) FROM \
           (SELECT s.tbl::text || '.' || pg_catalog.quote_ident(s.col) AS t, sum(s.values) AS n FROM ekm.ciphertext_scan s \
            WHERE s.job_id = $1 AND s.key_id NOT LIKE 'not scanned: %' AND NOT EXISTS (SELECT 1 FROM ekm.registered_column r WHERE r.tbl = s.tbl AND r.col = s.col) \
            GROUP BY 1) u",
        vec![scan.into()],
    )?;
    let unscanned = spi::one::<String>(
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

/// On the coordinator of a Citus cluster: every worker node has the
/// coordinator's keys (the same ids, states and wrapped material) and its
/// master key unwraps them; the node that differs is named. Nothing on a
/// single node.
fn check_citus_nodes() -> EkmResult<Option<HealthRow>> {
    use crate::pg::citus::{self, Node};
    match citus::node()? {
        Node::Single => Ok(None),
        Node::Worker => Ok(Some(row(
            "citus_nodes",
            "ok",
            "this is a Citus worker node: its keys come from the coordinator, whose ekm_health() checks every node".into(),
        ))),
        Node::Coordinator => {
            let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap_or_default();
            let mine = parse(&crate::keys::cluster::state()?);
            let nodes = citus::read_on_workers("SELECT ekm._ekm_cluster_state()")?;
            let mut bad = Vec::new();
            for (node, ok, result) in &nodes {
                if !ok {
                    bad.push(format!("node {node} cannot be checked: {result}"));
                    continue;
                }
                let theirs = parse(result);
                if theirs["digest"] != mine["digest"] {
                    bad.push(format!(
                        "node {node} does not have the coordinator's keys ({} keys there, {} here): SELECT ekm_cluster_sync() sends them",
                        theirs["keys"], mine["keys"]
                    ));
                }
                if theirs["unwrap"] != "ok" {
                    bad.push(format!(
                        "node {node}: {} (configure the same master key on every node)",
                        theirs["unwrap"].as_str().unwrap_or("its master key cannot be checked")
                    ));
                }
            }
            Ok(Some(if bad.is_empty() {
                row(
                    "citus_nodes",
                    "ok",
                    format!(
                        "{} worker node(s) have the coordinator's {} keys, and each node's master key unwraps them",
                        nodes.len(),
                        mine["keys"]
                    ),
                )
            } else {
                row("citus_nodes", "failed", bad.join("; "))
            }))
        }
    }
}

/// `log_statement = 'all'` (or 'mod') logs every statement's text before it
/// runs: ekm redacts those that name its functions, but a statement that
/// passes plaintext to a function calling ekm internally is logged as is.
fn check_log_statement() -> EkmResult<HealthRow> {
    let (setting, registered) = spi::two::<String, i64>(
        "SELECT pg_catalog.current_setting('log_statement'), (SELECT count(*) FROM ekm.registered_column)",
        vec![],
    )?;
    let setting = setting.unwrap_or_default();
    // pg_stat_statements keeps the text of utility statements as it was
    // written (ALTER SYSTEM SET ekm.master_key_command = '...'), out of
    // ekm's reach; it replaces the constants of other statements. From
    // PostgreSQL 18 on it replaces ALTER SYSTEM's value too ($1): nothing
    // to warn about there (t_redaction shows both).
    let pgss = pg_sys::PG_VERSION_NUM < 180000
        && spi::one::<bool>(
        "SELECT coalesce(pg_catalog.current_setting('pg_stat_statements.track_utility', true) OPERATOR(pg_catalog.=) 'on', false)",
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
    let n = spi::one::<i64>(
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
        let context = spi::one::<String>(
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
