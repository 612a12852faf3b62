//! Rotation on a Citus cluster, the coordinator's side and what the
//! protocol asks (docs/design.md, section 9, "Rotation of distributed and
//! reference tables"; the worker node's side is jobs::node). The
//! coordinator's job does not touch
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

use crate::pg::citus::{self, Node};
use crate::pg::spi;
use ekm_core::{EkmError, Result};

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
        // (a worker's first call: a node whose part failed or needs
        // attention tries again, the coordinator's job having been resumed)
        nodes_ready(job_id, false, true)?;
    }
    STARTED.with(|s| s.set(job_id));
    Ok(())
}

/// On the coordinator: starts, resumes or reads every worker node's job
/// for job `job_id` (with `final_check`, each node also runs check #2 on
/// its placements), records where each stands in ekm.rotation_node, and
/// says whether every node is verified. A node that cannot be reached, or
/// that is not verified yet, is named in the job's waiting_for.
///
/// A node whose part failed or needs attention fails the coordinator's job
/// (an Err naming it): fixed there, `ekm_rotation_resume` on the
/// coordinator resumes both (`resume`: this call resumes the nodes' parts).
pub(crate) fn nodes_ready(
    job_id: i64,
    final_check: bool,
    resume: bool,
) -> std::result::Result<bool, String> {
    let e = |x: EkmError| x.to_string();
    let order = spi::one::<String>(
        "SELECT pg_catalog.format('SELECT ekm._ekm_node_job(%L::jsonb)', \
                jsonb_build_object('job_id', job_id, 'kind', kind, 'from_key', from_key, 'to_key', to_key, \
                                   'batch_size', batch_size, 'state', state, 'final', $2, 'resume', $3)::text) \
         FROM ekm.rotation_job WHERE job_id = $1",
        vec![job_id.into(), final_check.into(), resume.into()],
    )
    .map_err(e)?
    .ok_or_else(|| format!("rotation job {job_id} does not exist"))?;
    let mut waiting = Vec::new();
    let mut stopped = Vec::new();
    let mut send_catalog = false;
    for (node, ok, result) in citus::read_on_workers(&order).map_err(e)? {
        let v: serde_json::Value = if ok {
            serde_json::from_str(&result).unwrap_or_else(
                |_| serde_json::json!({"state": "error", "error": "the node's answer is not JSON"}),
            )
        } else if !citus::reachable(&node).map_err(e)? {
            serde_json::json!({"state": "unreachable", "error": result})
        } else {
            serde_json::json!({"state": "error", "error": result})
        };
        let state = v["state"].as_str().unwrap_or("error").to_string();
        send_catalog |= v["catalog"].as_bool() == Some(false);
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
        if state == "failed" || state == "needs_attention" {
            stopped.push(format!(
                "worker node {node}: its part of the job {}: {}",
                if state == "failed" {
                    "failed"
                } else {
                    "needs attention"
                },
                v["error"].as_str().unwrap_or("see ekm.rotation_job there")
            ));
        } else if state != "verified" && state != "done" {
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
    if !stopped.is_empty() {
        return Err(format!(
            "{}; fix it on that node, then SELECT ekm_rotation_resume({job_id}) on the coordinator",
            stopped.join("; ")
        ));
    }
    if send_catalog {
        // a node without the coordinator's keys (added since the key
        // switch): it gets them, and the registrations, with this step's
        // distributed transaction, and starts its part at the next call
        crate::keys::cluster::propagate(false).map_err(e)?;
        crate::keys::cluster::propagate_registrations().map_err(e)?;
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
pub(crate) fn verified(job_id: i64) -> std::result::Result<(), String> {
    spi::exec(
        "UPDATE ekm.rotation_job SET verified_at = clock_timestamp(), \
                waiting_for = 'the coordinator''s final check of every node, then the retire' \
         WHERE job_id = $1 AND state = 'running'",
        vec![job_id.into()],
    )
    .map_err(|e| e.to_string())?;
    pgrx::log!("ekm: rotation job {job_id}: this node's part is verified; the coordinator retires the old keys");
    Ok(())
}
