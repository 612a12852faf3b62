//! ekm on a Citus cluster (docs/design.md, section 9; README "Scaling out
//! with Citus"): the key tables' triggers that send every key change from
//! the coordinator to the worker nodes and keep a worker node's keys the
//! coordinator's, the function a worker node applies them with, each node's
//! state for `ekm_health()`, and `ekm_cluster_sync()`. Thin: the work is in keys::cluster.

use crate::keys::cluster;
use crate::pg::citus::{self, Node};
use crate::pg::error::{raise_with, OrRaise};
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

/// Sends the coordinator's key catalog to every worker node now, in this
/// transaction (after `citus_add_node`, or when `ekm_health()` says a node
/// differs). How many worker nodes received it.
#[pg_extern(volatile)]
fn ekm_cluster_sync() -> i64 {
    match citus::node().or_raise() {
        Node::Coordinator => {
            let n = cluster::propagate(false).or_raise();
            cluster::propagate_registrations().or_raise();
            n
        }
        Node::Worker => raise_with(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "this is a Citus worker node: ekm's keys come from the coordinator".into(),
            Some("run SELECT ekm_cluster_sync() on the coordinator".into()),
        ),
        Node::Single => 0,
    }
}

#[pg_schema]
mod ekm {
    use super::*;

    /// On a worker node: makes its keys the coordinator's (sent by the
    /// coordinator's key-table trigger or `ekm_cluster_sync()`, as a
    /// superuser, in the coordinator's distributed transaction).
    #[pg_extern(volatile)]
    fn _ekm_cluster_apply(catalog: pgrx::JsonB) -> i64 {
        cluster::apply(catalog, &crate::jobs::node::retire_here).or_raise()
    }

    /// On a worker node: makes its registrations of Citus tables the
    /// coordinator's (sent with every registration change on the
    /// coordinator, and by `ekm_cluster_sync()`), and registers the shard
    /// placements it holds.
    #[pg_extern(volatile)]
    fn _ekm_cluster_register(registrations: pgrx::JsonB) -> i64 {
        crate::jobs::node::apply_registrations(&registrations.0).or_raise()
    }

    /// On a worker node: starts, resumes, cancels or checks this node's
    /// part of the coordinator's rotation job (called by the coordinator's
    /// job, as a superuser); where it stands, as JSON.
    #[pg_extern(volatile)]
    fn _ekm_node_job(request: pgrx::JsonB) -> String {
        crate::jobs::node::node_job(&request.0).or_raise()
    }

    /// On a worker node, for the coordinator's `ekm_cleanup_old_keys`: per
    /// key, the values on it in this node's registered columns (its shard
    /// placements) and why this node's latest scan does not clear it.
    #[pg_extern(volatile)]
    fn _ekm_node_cleanup_check(keys: Vec<String>) -> String {
        crate::sql::cleanup::node_check(keys).or_raise()
    }

    /// This node's key catalog digest and whether its master key unwraps
    /// every key, as JSON (read by the coordinator's `ekm_health()`).
    #[pg_extern(volatile)]
    fn _ekm_cluster_state() -> String {
        cluster::state().or_raise()
    }

    /// Deferred constraint trigger on `ekm.key` and `ekm.key_material`: at
    /// commit, after every change of the transaction, the coordinator sends
    /// its whole catalog to the worker nodes (once per transaction).
    #[pg_trigger]
    fn _ekm_key_cluster<'a>(
        _trigger: &'a PgTrigger<'a>,
    ) -> std::result::Result<Option<PgHeapTuple<'a, impl WhoAllocated>>, PgTriggerError> {
        cluster::propagate(true).or_raise();
        Ok(None::<PgHeapTuple<'a, pgrx::AllocatedByRust>>)
    }

    /// BEFORE trigger on `ekm.key` (INSERT, DELETE, a change of state) and
    /// `ekm.key_material`: on a worker node, only the coordinator's catalog
    /// changes them.
    #[pg_trigger]
    fn _ekm_key_worker_guard<'a>(
        trigger: &'a PgTrigger<'a>,
    ) -> std::result::Result<Option<PgHeapTuple<'a, impl WhoAllocated>>, PgTriggerError> {
        if !cluster::applying() && citus::node().or_raise() == Node::Worker {
            raise_with(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "this is a Citus worker node: ekm's keys are managed on the coordinator".into(),
                Some("run the ekm key functions on the coordinator; it sends every key change to the worker nodes in the same transaction".into()),
            );
        }
        Ok(trigger.new().or(trigger.old()))
    }
}
