//! Cleanup of old keys, the runbook's `cleanup_old_keys`:
//! `ekm_cleanup_old_keys` destroys keys retired long enough that no
//! registered column uses and the latest scan of the database found nowhere;
//! on a Citus coordinator, on every worker node too (each counts its
//! registered columns and shard placements and answers from its own scan;
//! docs/design.md, section 9), and the worker node's side of that check.

use crate::jobs::scan::{self, registered_columns};
use crate::keys::lifecycle::lock_key_changes;
use crate::keys::{catalog, keycache};
use crate::pg::citus::{self, Node};
use crate::pg::error::{internal, raise_with, refuse_on_standby, OrRaise};
use crate::pg::owner::as_owner;
use crate::pg::spi;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

type EkmResult<T> = ekm_core::Result<T>;

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
        crate::jobs::start::sync_partitions()?;
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
    // every registered column; on a Citus coordinator, also on every worker
    // node (its shard placements, and its own scan of its database).
    let ids: Vec<String> = candidates.iter().map(|c| c.0.clone()).collect();
    let mut in_use = in_use_here(&ids, &fernet)?;
    let coordinator = citus::node()? == Node::Coordinator;
    let mut on_nodes = vec![NodeVerdict::default(); ids.len()];
    if coordinator {
        on_nodes = node_checks(&ids)?;
        for (i, v) in on_nodes.iter().enumerate() {
            in_use[i] += v.in_use;
        }
    }
    let mut out = Vec::new();
    for (((id, retired_at), n), nodes) in candidates.into_iter().zip(in_use).zip(on_nodes) {
        // Registered columns are not the whole database: a copy in another
        // column, an audit table, a materialized view would be lost with
        // the key. A scan of the database (ekm_scan_database) that started
        // after the key was retired must have found none of it (on a Citus
        // coordinator: every node's own scan).
        let unscanned = if n > 0 {
            None
        } else {
            let mut why: Vec<String> = scan_verdict(&id, coordinator)?.into_iter().collect();
            why.extend(nodes.why);
            (!why.is_empty()).then(|| why.join("; "))
        };
        let action = if !nodes.unchecked.is_empty() {
            // not even with force: a node that was not asked may hold values
            let why = nodes.unchecked.join("; ");
            if !dry_run {
                pgrx::warning!("ekm: key {id} is kept: {why}");
            }
            format!("kept: {why}")
        } else if n > 0 {
            if !dry_run {
                pgrx::warning!(
                    "ekm: key {id} is kept: {n} values in registered columns still use it"
                );
            }
            format!("kept: {n} values in registered columns still use it")
        } else if let Some(why) = unscanned.as_ref().filter(|_| !force) {
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
            spi::exec(
                "UPDATE ekm.key_material SET wrapped = NULL WHERE key_id = $1",
                vec![id.clone().into()],
            )?;
            spi::exec(
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
/// `cluster`: the Citus tables' shards are scanned on the nodes that hold
/// them (this node's scan does not read them: not a reason here).
fn scan_verdict(key_id: &str, cluster: bool) -> EkmResult<Option<String>> {
    let (scan, at) = spi::two::<i64, String>(
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
    let found = spi::one::<String>(
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
    let (foreign, unreadable) = spi::two::<String, String>(
        "SELECT string_agg(DISTINCT s.tbl::text, ', ') FILTER (WHERE s.key_id = $2), \
                string_agg(DISTINCT s.tbl::text, ', ') FILTER (WHERE s.key_id = $3) \
         FROM ekm.ciphertext_scan s WHERE s.job_id = $1",
        vec![
            scan.into(),
            crate::jobs::scan::NOT_SCANNED_FOREIGN.into(),
            crate::jobs::scan::NOT_SCANNED_UNREADABLE.into(),
        ],
    )?;
    let citus = spi::one::<String>(
        "SELECT string_agg(DISTINCT s.tbl::text, ', ') FROM ekm.ciphertext_scan s WHERE s.job_id = $1 AND s.key_id = $2",
        vec![scan.into(), crate::jobs::scan::NOT_SCANNED_CITUS.into()],
    )?;
    if let Some(f) = citus.filter(|_| !cluster) {
        why.push(format!(
            "the scan of the database finished {at} did not read the Citus tables {f} (their rows are in shards on the worker nodes), which may hold values on it"
        ));
    }
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
    let unattributed = spi::one::<String>(
        "SELECT string_agg(s.tbl::text || '.' || pg_catalog.quote_ident(s.col) || ': ' || s.values, ', ' ORDER BY s.tbl::text, s.col) \
         FROM ekm.ciphertext_scan s WHERE s.job_id = $1 AND s.key_id = $2 \
           AND EXISTS (SELECT 1 FROM ekm.key k WHERE k.key_id = $3 AND k.kind = 'fernet')",
        vec![
            scan.into(),
            crate::jobs::batchfn::FERNET_UNATTRIBUTED.into(),
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

/// Values on each of `ids` (imported Fernet keys where `fernet`) in this
/// node's registered columns, as each table's owner (security-restricted,
/// whatever the caller may read: counts that keep a key alive, not data for
/// the caller). Refuses while a registered column no longer exists.
fn in_use_here(ids: &[String], fernet: &[bool]) -> EkmResult<Vec<i64>> {
    let mut in_use = vec![0i64; ids.len()];
    let cols = registered_columns()?;
    // a Citus table's rows are in its shard placements, registered on (and
    // counted by) the nodes that hold them
    let citus_tables = citus::citus_tables()?;
    for (tbl, col, _, exists) in &cols {
        if !exists || citus_tables.contains(tbl) {
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
    Ok(in_use)
}

/// What the worker nodes say about one key: values on it in their
/// registered columns, why their own scans do not clear it, and the nodes
/// that could not be checked.
#[derive(Clone, Default)]
struct NodeVerdict {
    in_use: i64,
    why: Vec<String>,
    unchecked: Vec<String>,
}

/// On a Citus coordinator: every worker node's count of values on each of
/// `ids` in its registered columns (its shard placements), and why its own
/// latest scan of its database does not clear them; a node that cannot be
/// checked keeps them all.
fn node_checks(ids: &[String]) -> EkmResult<Vec<NodeVerdict>> {
    let command = spi::one::<String>(
        "SELECT pg_catalog.format('SELECT ekm._ekm_node_cleanup_check(%L::text[])', $1::text[])",
        vec![ids.to_vec().into()],
    )?
    .unwrap_or_default();
    let mut out = vec![NodeVerdict::default(); ids.len()];
    for (node, ok, result) in citus::read_on_workers(&command)? {
        let v: serde_json::Value = if ok {
            serde_json::from_str(&result).unwrap_or_default()
        } else {
            serde_json::Value::Null
        };
        for (i, id) in ids.iter().enumerate() {
            let k = &v[id.as_str()];
            if !ok || k.is_null() {
                out[i].unchecked.push(format!(
                    "worker node {node} could not be checked ({}), and may hold values on it",
                    if ok {
                        "no answer for this key"
                    } else {
                        result.as_str()
                    }
                ));
                continue;
            }
            out[i].in_use += k["in_use"].as_i64().unwrap_or(0);
            if let Some(why) = k["why"].as_str() {
                out[i].why.push(format!("on worker node {node}, {why}"));
            }
        }
    }
    Ok(out)
}

/// `ekm._ekm_node_cleanup_check`: on a Citus worker node, for the
/// coordinator's cleanup: per key of `ids`, the values on it in this node's
/// registered columns and why this node's latest scan does not clear it,
/// as JSON.
pub(crate) fn node_check(ids: Vec<String>) -> EkmResult<String> {
    if citus::node()? != Node::Worker {
        raise_with(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "ekm._ekm_node_cleanup_check runs only on a Citus worker node".into(),
            Some("ekm_cleanup_old_keys on the coordinator calls it on every worker node".into()),
        );
    }
    let (_, owner) = catalog::ekm_tables()?;
    as_owner(owner, || {
        let fernet = ids
            .iter()
            .map(|id| {
                spi::one::<bool>(
                    "SELECT kind = 'fernet' FROM ekm.key WHERE key_id = $1",
                    vec![id.clone().into()],
                )
                .map(|f| f.unwrap_or(false))
            })
            .collect::<EkmResult<Vec<bool>>>()?;
        let in_use = in_use_here(&ids, &fernet)?;
        let mut out = serde_json::Map::new();
        for (id, n) in ids.iter().zip(in_use) {
            out.insert(
                id.clone(),
                serde_json::json!({"in_use": n, "why": scan_verdict(id, true)?}),
            );
        }
        Ok(serde_json::Value::Object(out).to_string())
    })
}
