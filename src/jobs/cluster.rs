//! Rotation on a Citus cluster (docs/design.md, section 9, "Rotation of
//! distributed and reference tables"). The coordinator's job does not touch
//! shards: each worker node runs a job of its own (a *node job*) over the
//! shard placements it holds, with the single-node protocol (batches as the
//! table's owner, passes, check #1, the fence), and stops once verified.
//! The coordinator's job starts, resumes and reads the node jobs
//! (`ekm._ekm_node_job`, on a connection of its own per node), waits until
//! every node is verified, runs check #2 on every node under its key-change
//! lock, and only then retires, in the distributed transaction that carries
//! the key catalog; there each node refuses the retire unless its node job
//! is verified and no placement arrived since (`retire_here`), and marks its
//! node job done with it.

use crate::jobs::protocol::Step;
use crate::keys::catalog;
use crate::pg::citus::{self, Node};
use crate::pg::error::raise_with;
use crate::pg::owner::as_owner;
use crate::pg::spi;
use ekm_core::{EkmError, Result};
use pgrx::PgSqlErrorCode;

/// Part of the message with which a worker node refuses to retire a key
/// its node job has not verified; the coordinator's job waits on it
/// (jobs::helpers::retry_after) instead of failing.
pub const NOT_VERIFIED: &str = "has not verified its part of the rotation";

thread_local! {
    /// The coordinator's job whose node jobs this worker has started.
    static STARTED: std::cell::Cell<i64> = const { std::cell::Cell::new(0) };
}

/// Whether a job of `kind` on this node has worker nodes' parts: a
/// rotation or rollback on the coordinator of a Citus cluster.
pub(crate) fn coordinates(kind: &str) -> std::result::Result<bool, String> {
    Ok(matches!(kind, "rotate" | "rollback")
        && citus::node().map_err(|e| e.to_string())? == Node::Coordinator)
}

/// On the coordinator: once per worker of job `job_id`, starts (or
/// resumes) the node jobs at once, so the nodes work while the
/// coordinator moves its own tables.
pub(crate) fn start_nodes_once(job_id: i64, kind: &str) -> std::result::Result<(), String> {
    if STARTED.with(|s| s.get()) == job_id {
        return Ok(());
    }
    if coordinates(kind)? {
        nodes_ready(job_id, false)?;
    }
    STARTED.with(|s| s.set(job_id));
    Ok(())
}

/// On the coordinator: starts, resumes or reads every worker node's job
/// for job `job_id` (with `final_check`, each node also runs check #2 on
/// its placements), records where each stands in ekm.rotation_node, and
/// says whether every node is verified. A node that cannot be reached, or
/// that is not verified yet, is named in the job's waiting_for.
pub(crate) fn nodes_ready(job_id: i64, final_check: bool) -> std::result::Result<bool, String> {
    let e = |x: EkmError| x.to_string();
    let order = spi::one::<String>(
        "SELECT pg_catalog.format('SELECT ekm._ekm_node_job(%L::jsonb)', \
                jsonb_build_object('job_id', job_id, 'kind', kind, 'from_key', from_key, 'to_key', to_key, \
                                   'batch_size', batch_size, 'state', state, 'final', $2)::text) \
         FROM ekm.rotation_job WHERE job_id = $1",
        vec![job_id.into(), final_check.into()],
    )
    .map_err(e)?
    .ok_or_else(|| format!("rotation job {job_id} does not exist"))?;
    let mut waiting = Vec::new();
    for (node, ok, result) in citus::read_on_workers(&order).map_err(e)? {
        let v: serde_json::Value = if ok {
            serde_json::from_str(&result).unwrap_or_else(|_| {
                serde_json::json!({"state": "error", "error": "the node's answer is not JSON"})
            })
        } else if result.contains("connect") || result.contains("connection") {
            serde_json::json!({"state": "unreachable", "error": result})
        } else {
            serde_json::json!({"state": "error", "error": result})
        };
        let state = v["state"].as_str().unwrap_or("error").to_string();
        spi::exec(
            "INSERT INTO ekm.rotation_node AS n (job_id, node, state, tables, rows_done, rows_total, percent, blocks_total, waiting_for, error, updated_at) \
             SELECT $1, $2, r.state, coalesce(r.tables, 0), coalesce(r.rows_done, 0), coalesce(r.rows_total, 0), coalesce(r.percent, 0), \
                    coalesce(r.blocks_total, 0), r.waiting_for, r.error, now() \
             FROM jsonb_to_record($3) AS r(state text, tables int, rows_done bigint, rows_total bigint, percent numeric, blocks_total bigint, \
                                           waiting_for text, error text) \
             ON CONFLICT (job_id, node) DO UPDATE SET state = excluded.state, tables = excluded.tables, \
                rows_total = excluded.rows_total, percent = excluded.percent, waiting_for = excluded.waiting_for, error = excluded.error, \
                blocks_total = CASE WHEN excluded.state IN ('unreachable', 'error') THEN n.blocks_total ELSE excluded.blocks_total END, \
                rows_done = CASE WHEN excluded.state IN ('unreachable', 'error') THEN n.rows_done ELSE excluded.rows_done END, \
                updated_at = excluded.updated_at",
            vec![job_id.into(), node.clone().into(), pgrx::JsonB(v.clone()).into()],
        )
        .map_err(e)?;
        if state != "verified" && state != "done" {
            let why = v["waiting_for"]
                .as_str()
                .or(v["error"].as_str())
                .map(|w| format!(": {w}"))
                .unwrap_or_default();
            let pct = v["percent"]
                .as_f64()
                .map(|p| format!(" {p:.1}%"))
                .unwrap_or_default();
            waiting.push(format!("worker node {node} {state}{pct}{why}"));
        }
    }
    let what = (!waiting.is_empty()).then(|| waiting.join("; "));
    spi::exec(
        "UPDATE ekm.rotation_job SET waiting_for = $2 WHERE job_id = $1 AND waiting_for IS DISTINCT FROM $2",
        vec![job_id.into(), what.into()],
    )
    .map_err(e)?;
    Ok(waiting.is_empty())
}

/// On the coordinator, in the retire's transaction: every node's part is
/// done with the job.
pub(crate) fn nodes_done(job_id: i64) -> std::result::Result<(), String> {
    spi::exec(
        "UPDATE ekm.rotation_node SET state = 'done', percent = 100, waiting_for = NULL, updated_at = now() WHERE job_id = $1",
        vec![job_id.into()],
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// On the coordinator, in a cancel's transaction: cancels every worker
/// node's job of `job_id` in the same distributed transaction.
pub fn cancel_nodes(job_id: i64) -> Result<()> {
    if citus::node()? != Node::Coordinator {
        return Ok(());
    }
    let order = spi::one::<String>(
        "SELECT pg_catalog.format('SELECT ekm._ekm_node_job(%L::jsonb)', \
                jsonb_build_object('job_id', $1::bigint, 'state', 'cancelled')::text)",
        vec![job_id.into()],
    )?
    .unwrap_or_default();
    citus::run_on_workers(&order)
}

/// Whether `job_id` is a worker node's part of a coordinator's job.
pub(crate) fn is_node_job(job_id: i64) -> std::result::Result<bool, String> {
    Ok(spi::one::<bool>(
        "SELECT coordinator_job IS NOT NULL FROM ekm.rotation_job WHERE job_id = $1",
        vec![job_id.into()],
    )
    .map_err(|e| e.to_string())?
    .unwrap_or(false))
}

/// A node job passed its check and its fence: it is verified, and its
/// worker stops; the coordinator's final step checks it again and retires.
pub(crate) fn verified(job_id: i64) -> std::result::Result<Step, String> {
    spi::exec(
        "UPDATE ekm.rotation_job SET verified_at = clock_timestamp(), \
                waiting_for = 'the coordinator''s final check of every node, then the retire' \
         WHERE job_id = $1 AND state = 'running'",
        vec![job_id.into()],
    )
    .map_err(|e| e.to_string())?;
    pgrx::log!("ekm: rotation job {job_id}: this node's part is verified; the coordinator retires the old keys");
    Ok(Step::Stop)
}

/// `ekm._ekm_node_job`: on a worker node, does what the coordinator's job
/// `order` asks of this node's part and says where it stands, as JSON.
/// `order`: `job_id` (the coordinator's), `kind`, `from_key`, `to_key`,
/// `batch_size`, `state` (`running`: start it or resume it; `cancelled`:
/// cancel it), `final` (check #2 now).
pub fn node_job(order: &serde_json::Value) -> Result<String> {
    if citus::node()? != Node::Worker {
        raise_with(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "ekm._ekm_node_job runs only on a Citus worker node".into(),
            Some("the coordinator's rotation job calls it on every worker node".into()),
        );
    }
    let cjob = order["job_id"]
        .as_i64()
        .ok_or_else(|| EkmError::Internal("the coordinator's order has no job_id".into()))?;
    let (_, owner) = catalog::ekm_tables()?;
    as_owner(owner, || {
        crate::keys::locks::lock_xact(
            crate::keys::locks::EkmLock::KeyChange,
            "start or check this node's part of the coordinator's rotation",
        );
        if order["state"].as_str() == Some("cancelled") {
            spi::exec(
                "UPDATE ekm.rotation_job SET state = 'cancelled', finished_at = now() \
                 WHERE coordinator_job = $1 AND state = 'running'",
                vec![cjob.into()],
            )?;
            return status(cjob);
        }
        let local = spi::two::<i64, String>(
            "SELECT job_id, state FROM ekm.rotation_job WHERE coordinator_job = $1 ORDER BY job_id DESC LIMIT 1",
            vec![cjob.into()],
        )?;
        let launch = match local {
            (Some(j), Some(state)) if state == "done" => {
                let _ = j;
                false
            }
            (Some(j), Some(state)) if state != "running" => {
                // resumed on the coordinator (or failed here): on again
                spi::exec(
                    "UPDATE ekm.rotation_job SET state = 'running', error = NULL, finished_at = NULL, verified_at = NULL, waiting_for = NULL \
                     WHERE job_id = $1",
                    vec![j.into()],
                )?;
                catalog::audit(
                    "rotation_resumed",
                    None,
                    &catalog::json_object(&[("job_id", &j.to_string()), ("coordinator_job", &cjob.to_string())]),
                )?;
                true
            }
            (Some(j), _) => running(j, order["kind"].as_str().unwrap_or("rotate"), order["final"].as_bool() == Some(true))?,
            _ => {
                if !start(cjob, order)? {
                    return Ok(serde_json::json!({
                        "state": "waiting",
                        "waiting_for": "the coordinator's key catalog (it arrives with the key switch; else SELECT ekm_cluster_sync() on the coordinator)",
                    })
                    .to_string());
                }
                true
            }
        };
        if launch {
            let j = spi::one::<i64>(
                "SELECT job_id FROM ekm.rotation_job WHERE coordinator_job = $1 ORDER BY job_id DESC LIMIT 1",
                vec![cjob.into()],
            )?
            .unwrap_or_default();
            if let Err(why) = crate::jobs::worker::launch(j) {
                pgrx::warning!("ekm: rotation job {j}: could not start its worker now ({why}); the coordinator asks again");
            }
        }
        status(cjob)
    })
}

/// Starts this node's part of the coordinator's job `cjob`, once the
/// coordinator's key switch has reached this node (its key to move to is
/// active here); whether it did.
fn start(cjob: i64, order: &serde_json::Value) -> Result<bool> {
    let to_key = order["to_key"].as_str().unwrap_or_default();
    let active = spi::one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM ekm.key WHERE key_id = $1 AND rotation_status = 'active')",
        vec![to_key.into()],
    )?
    .unwrap_or(false);
    if !active {
        return Ok(false);
    }
    // an unfinished job of this node (an earlier coordinator job's part,
    // superseded there) gives way
    spi::exec(
        "UPDATE ekm.rotation_job SET state = 'failed', error = $1, finished_at = now() \
         WHERE state IN ('running', 'cancelled', 'needs_attention') AND kind <> 'scan'",
        vec![format!("superseded by the coordinator's job {cjob}").into()],
    )?;
    let kind = order["kind"].as_str().unwrap_or("rotate");
    let batch_size = order["batch_size"].as_i64().unwrap_or(1000) as i32;
    let j = crate::jobs::start::start_job(
        kind,
        order["from_key"].as_str(),
        to_key,
        batch_size,
        "citus coordinator",
        None,
        &[("coordinator_job", &cjob.to_string())],
    )?;
    spi::exec(
        "UPDATE ekm.rotation_job SET coordinator_job = $2 WHERE job_id = $1",
        vec![j.into(), cjob.into()],
    )?;
    Ok(true)
}

/// This node's job `j` runs: with `final_check`, check #2 of a verified job
/// (a value left sends its column back for another pass); else a verified
/// job covers placements that arrived since (a shard moved here). Whether
/// its worker must be started (it has work and none runs it).
fn running(j: i64, kind: &str, final_check: bool) -> Result<bool> {
    let verified = spi::one::<bool>(
        "SELECT verified_at IS NOT NULL FROM ekm.rotation_job WHERE job_id = $1",
        vec![j.into()],
    )?
    .unwrap_or(false);
    if verified {
        let still = if final_check {
            crate::jobs::protocol::node_final_check(j, kind).map_err(EkmError::Internal)?
        } else {
            crate::jobs::protocol::cover_new_registrations(j).map_err(EkmError::Internal)? == 0
        };
        if still {
            return Ok(false);
        }
        spi::exec(
            "UPDATE ekm.rotation_job SET verified_at = NULL, waiting_for = NULL WHERE job_id = $1 AND state = 'running'",
            vec![j.into()],
        )?;
    }
    // no worker holds the job's lock: start one
    let lock = crate::keys::locks::EkmLock::Job(j);
    if crate::keys::locks::try_lock_session(lock) {
        crate::keys::locks::unlock_session(lock);
        return Ok(true);
    }
    Ok(false)
}

/// Where this node's part of the coordinator's job `cjob` stands, as JSON.
fn status(cjob: i64) -> Result<String> {
    Ok(spi::one::<String>(
        "SELECT jsonb_build_object( \
             'state', CASE WHEN j.state = 'running' AND j.verified_at IS NOT NULL THEN 'verified' ELSE j.state END, \
             'local_job', j.job_id, 'tables', (SELECT count(DISTINCT c.tbl) FROM ekm.rotation_cursor c WHERE c.job_id = j.job_id), \
             'rows_done', j.rows_done, \
             'blocks_total', (SELECT coalesce(sum(c.blocks_total), 0) FROM ekm.rotation_cursor c WHERE c.job_id = j.job_id), \
             'rows_total', (SELECT coalesce(sum(greatest(c.rows_total, c.rows_done)), 0) FROM ekm.rotation_cursor c WHERE c.job_id = j.job_id), \
             'percent', (SELECT coalesce(round(100.0 * sum(CASE WHEN c.state = 'done' THEN c.blocks_total ELSE least(c.next_block, c.blocks_total) END) \
                                              / greatest(sum(c.blocks_total), 1), 1), 100) \
                         FROM ekm.rotation_cursor c WHERE c.job_id = j.job_id), \
             'waiting_for', CASE WHEN j.verified_at IS NULL THEN j.waiting_for END, 'error', j.error)::text \
         FROM ekm.rotation_job j WHERE j.coordinator_job = $1 ORDER BY j.job_id DESC LIMIT 1",
        vec![cjob.into()],
    )?
    .unwrap_or_else(|| serde_json::json!({"state": "waiting", "waiting_for": "no job yet"}).to_string()))
}

/// On a worker node, while it applies the coordinator's catalog: `keys`
/// are to retire. Allowed only when this node's job is verified (or
/// nothing is registered here) and no shard placement arrived since
/// (registering it now would leave it unchecked); then the node job is
/// done, in the same distributed transaction. Else the whole transaction
/// is refused, on every node, and the coordinator's job waits.
pub fn retire_here(keys: &[String]) -> Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let (j, verified, kind) = spi::three::<i64, bool, String>(
        "SELECT job_id, verified_at IS NOT NULL, kind FROM ekm.rotation_job \
         WHERE coordinator_job IS NOT NULL AND state = 'running' ORDER BY job_id DESC LIMIT 1",
        vec![],
    )?;
    let registered = spi::one::<i64>("SELECT count(*) FROM ekm.registered_column", vec![])?.unwrap_or(0);
    let list = keys.join(", ");
    let refuse = |why: &str| -> Result<()> {
        raise_with(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("this worker node {NOT_VERIFIED}: {list} cannot retire yet ({why})"),
            Some("the coordinator's rotation job waits and retires once every node is verified; see ekm.rotation_progress on the coordinator".into()),
        )
    };
    match (j, verified) {
        (Some(j), Some(true)) => {
            if crate::jobs::start::sync_partitions()? > 0 {
                return refuse("a shard placement arrived on this node since its check");
            }
            let rows = spi::one_mut::<i64>(
                "UPDATE ekm.rotation_job SET state = 'done', finished_at = clock_timestamp(), waiting_for = NULL \
                 WHERE job_id = $1 AND state = 'running' RETURNING rows_done",
                vec![j.into()],
            )?
            .unwrap_or(0);
            let kind = kind.unwrap_or_default();
            catalog::audit(
                if kind == "rollback" { "rollback_done" } else { "rotation_done" },
                None,
                &catalog::json_object(&[
                    ("job_id", &j.to_string()),
                    ("kind", &kind),
                    ("rows", &rows.to_string()),
                    ("retired", &list),
                    ("by", "citus coordinator"),
                ]),
            )
        }
        _ if registered == 0 => Ok(()),
        (Some(_), _) => refuse("its job has not passed its check and fence"),
        (None, _) => refuse("this node has no job of the coordinator's rotation"),
    }
}
