//! Rotation on a Citus cluster, a worker node's side (docs/design.md,
//! section 9): `ekm._ekm_node_job` (start, resume, cancel, check this node's
//! part of the coordinator's job, and say where it stands), the refusal to
//! retire a key this node has not verified (`retire_here`, called as the
//! coordinator's catalog is applied), and the coordinator's registrations of
//! Citus tables applied here (`apply_registrations`).

use crate::jobs::cluster::NOT_VERIFIED;
use crate::keys::catalog;
use crate::pg::citus::{self, Node};
use crate::pg::error::raise_with;
use crate::pg::owner::as_owner;
use crate::pg::spi;
use ekm_core::{EkmError, Result};
use pgrx::PgSqlErrorCode;

/// `ekm._ekm_node_job`: on a worker node, does what the coordinator's job
/// `order` asks of this node's part and says where it stands, as JSON.
/// `order`: `job_id` (the coordinator's), `kind`, `from_key`, `to_key`,
/// `batch_size`, `state` (`running`: start it, or resume it if it was
/// cancelled; `cancelled`: cancel it), `resume` (resume it whatever stopped
/// it), `final` (check #2 now).
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
            (Some(_), Some(state)) if state == "done" => None,
            // cancelled with the coordinator's job (which runs again), or,
            // failed or needing attention here, resumed on the coordinator
            // (a worker's first call): on again
            (Some(j), Some(state))
                if state == "cancelled"
                    || (state != "running" && order["resume"].as_bool() == Some(true)) =>
            {
                spi::exec(
                    "UPDATE ekm.rotation_job SET state = 'running', error = NULL, finished_at = NULL, verified_at = NULL, waiting_for = NULL \
                     WHERE job_id = $1",
                    vec![j.into()],
                )?;
                catalog::audit(
                    "rotation_resumed",
                    None,
                    &catalog::json_object(&[
                        ("job_id", &j.to_string()),
                        ("coordinator_job", &cjob.to_string()),
                    ]),
                )?;
                Some(j)
            }
            (Some(j), Some(state)) if state == "running" => running(
                j,
                order["kind"].as_str().unwrap_or("rotate"),
                order["final"].as_bool() == Some(true),
            )?
            .then_some(j),
            // failed or needing attention: the coordinator's job says so and
            // stops until it is resumed
            (Some(_), _) => None,
            _ => {
                let Some(j) = start(cjob, order)? else {
                    return Ok(serde_json::json!({
                        "state": "waiting",
                        "catalog": false,
                        "waiting_for": "the coordinator's key catalog (a node added since the key switch: the coordinator's job sends it)",
                    })
                    .to_string());
                };
                Some(j)
            }
        };
        if let Some(j) = launch {
            if let Err(why) = crate::jobs::worker::launch(j) {
                pgrx::warning!("ekm: rotation job {j}: could not start its worker now ({why}); the coordinator asks again");
            }
        }
        status(cjob)
    })
}

/// Starts this node's part of the coordinator's job `cjob`, once the
/// coordinator's key switch has reached this node (its key to move to is
/// active here); its job, if it did.
fn start(cjob: i64, order: &serde_json::Value) -> Result<Option<i64>> {
    let to_key = order["to_key"].as_str().unwrap_or_default();
    let active = spi::one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM ekm.key WHERE key_id = $1 AND rotation_status = 'active')",
        vec![to_key.into()],
    )?
    .unwrap_or(false);
    if !active {
        return Ok(None);
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
    Ok(Some(j))
}

/// This node's job `j` runs: with `final_call`, check #2 of a verified job
/// (a value left sends its column back for another pass); else a verified
/// job covers placements that arrived since (a shard moved here). Whether
/// its worker must be started (it has work and none runs it).
fn running(j: i64, kind: &str, final_call: bool) -> Result<bool> {
    let verified = spi::one::<bool>(
        "SELECT verified_at IS NOT NULL FROM ekm.rotation_job WHERE job_id = $1",
        vec![j.into()],
    )?
    .unwrap_or(false);
    if verified {
        let still = if final_call {
            final_check(j, kind)?
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

/// Check #2 of this node's verified job `j`, for the coordinator's final
/// step (in the call's own session: the batch functions once per session).
fn final_check(j: i64, kind: &str) -> Result<bool> {
    let have = spi::one::<bool>(
        "SELECT pg_catalog.to_regprocedure('pg_temp._ekm_left(pg_catalog.text, pg_catalog.text)') IS NOT NULL",
        vec![],
    )?
    .unwrap_or(false);
    if !have {
        crate::jobs::helpers::create_batch_functions().map_err(EkmError::Internal)?;
    }
    crate::jobs::protocol::node_final_check(j, kind).map_err(EkmError::Internal)
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
    let registered =
        spi::one::<i64>("SELECT count(*) FROM ekm.registered_column", vec![])?.unwrap_or(0);
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
                if kind == "rollback" {
                    "rollback_done"
                } else {
                    "rotation_done"
                },
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

/// On a worker node: makes its registrations of Citus tables the
/// coordinator's `registrations` (sent by the coordinator), then
/// registers the shard placements it holds. How many it has (registered
/// by [`crate::keys::cluster::propagate_registrations`]).
pub fn apply_registrations(registrations: &serde_json::Value) -> Result<i64> {
    if citus::node()? != Node::Worker {
        crate::pg::error::raise_with(
            pgrx::PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "ekm._ekm_cluster_register runs only on a Citus worker node".into(),
            Some("register Citus tables on the coordinator".into()),
        );
    }
    let (_, owner) = catalog::ekm_tables()?;
    crate::keys::cluster::while_applying(|| {
        as_owner(owner, || {
            crate::keys::locks::lock_xact(
                crate::keys::locks::EkmLock::KeyChange,
                "apply the coordinator's registrations",
            );
            if let Some(missing) = spi::one::<String>(
            "SELECT r.\"table\" FROM jsonb_to_recordset($1) AS r(\"table\" text) WHERE pg_catalog.to_regclass(r.\"table\") IS NULL LIMIT 1",
            vec![pgrx::JsonB(registrations.clone()).into()],
        )? {
            crate::pg::error::raise_with(
                pgrx::PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                format!("the coordinator registered {missing}, which this worker node does not have"),
                Some("Citus syncs its tables' metadata to every node (citus_add_node, start_metadata_sync_to_node); then SELECT ekm_cluster_sync() on the coordinator".into()),
            );
        }
            // the coordinator's registrations of Citus tables, and no others
            spi::exec(
            "DELETE FROM ekm.registered_column r \
             WHERE (r.tbl::oid IN (SELECT logicalrelid::oid FROM pg_catalog.pg_dist_partition) AND r.parent IS NULL \
                    AND NOT EXISTS (SELECT 1 FROM jsonb_to_recordset($1) AS x(\"table\" text, col name, context text) \
                                    WHERE pg_catalog.to_regclass(x.\"table\") = r.tbl AND x.col = r.col AND x.context = r.context)) \
                OR (r.parent::oid IN (SELECT logicalrelid::oid FROM pg_catalog.pg_dist_partition) \
                    AND NOT EXISTS (SELECT 1 FROM jsonb_to_recordset($1) AS x(\"table\" text, col name, context text) \
                                    WHERE pg_catalog.to_regclass(x.\"table\") = r.parent AND x.col = r.col AND x.context = r.context))",
            vec![pgrx::JsonB(registrations.clone()).into()],
        )?;
            spi::exec(
            "INSERT INTO ekm.registered_column (tbl, col, context, registered_by) \
             SELECT pg_catalog.to_regclass(x.\"table\"), x.col, x.context, x.registered_by \
             FROM jsonb_to_recordset($1) AS x(\"table\" text, col name, context text, registered_by name) \
             ON CONFLICT (tbl, col) DO NOTHING",
            vec![pgrx::JsonB(registrations.clone()).into()],
        )?;
            crate::jobs::start::sync_partitions()?;
            Ok(spi::one::<i64>("SELECT count(*) FROM ekm.registered_column", vec![])?.unwrap_or(0))
        })
    })
}
