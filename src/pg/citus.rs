//! Citus, when this database has it (docs/design.md, section 9): which node
//! this is (the coordinator of worker nodes, a worker, or neither), and
//! sending a command to every worker node inside the coordinator's
//! distributed transaction (Citus commits it with two-phase commit, with
//! the local transaction). ekm is never linked against Citus: the function
//! is looked up in `citus.so` when it is first needed, and only where the
//! `citus` extension exists.

use ekm_core::{EkmError, Result};
use pgrx::prelude::*;

/// What this node is in a Citus cluster.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Node {
    /// no Citus in this database, or a Citus node with no worker nodes
    Single,
    /// the coordinator (group 0) of at least one active worker node
    Coordinator,
    /// a worker node (a group other than 0: Citus synced its metadata here)
    Worker,
}

/// Which node this is. Read from Citus's catalogs (`pg_dist_local_group`,
/// `pg_dist_node`) when the `citus` extension exists in this database.
pub fn node() -> Result<Node> {
    if !has_citus()? {
        return Ok(Node::Single);
    }
    let (group, workers) = crate::pg::spi::two::<i32, i64>(
        "SELECT (SELECT groupid FROM pg_catalog.pg_dist_local_group), \
                (SELECT count(*) FROM pg_catalog.pg_dist_node \
                 WHERE groupid OPERATOR(pg_catalog.<>) 0 AND isactive AND noderole OPERATOR(pg_catalog.=) 'primary')",
        vec![],
    )?;
    Ok(match (group.unwrap_or(0), workers.unwrap_or(0)) {
        (0, 0) => Node::Single,
        (0, _) => Node::Coordinator,
        _ => Node::Worker,
    })
}

/// Whether the `citus` extension exists in this database.
fn has_citus() -> Result<bool> {
    Ok(crate::pg::spi::one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'citus')",
        vec![],
    )?
    .unwrap_or(false))
}

type SendFn = unsafe extern "C-unwind" fn(*const std::ffi::c_char);

/// Runs `command` on every worker node that has Citus's metadata, as the
/// Citus extension's owner (a superuser), in this transaction: Citus sends
/// it on its coordinated connections and prepares and commits it on every
/// node with this transaction (two-phase commit). An error on any node
/// aborts this transaction. Only on the coordinator.
pub fn run_on_workers(command: &str) -> Result<()> {
    static SEND: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let f = *SEND.get_or_init(|| unsafe {
        // (signalNotFound: an ERROR if citus.so or the function is missing)
        pg_sys::load_external_function(
            c"citus".as_ptr(),
            c"SendCommandToWorkersWithMetadataViaSuperUser".as_ptr(),
            true,
            std::ptr::null_mut(),
        ) as usize
    });
    if f == 0 {
        return Err(EkmError::Internal(
            "Citus's SendCommandToWorkersWithMetadataViaSuperUser was not found in citus.so".into(),
        ));
    }
    let send: SendFn = unsafe { std::mem::transmute::<usize, SendFn>(f) };
    let c = std::ffi::CString::new(command).map_err(|_| {
        EkmError::Internal("a command for the worker nodes holds a NUL byte".into())
    })?;
    // (an ERROR raised in Citus unwinds through here as a Rust panic)
    unsafe { pg_sys::ffi::pg_guard_ffi_boundary(|| send(c.as_ptr())) };
    Ok(())
}

/// `query` run on every active worker node (Citus's
/// `run_command_on_workers`: a connection of its own per node, outside this
/// transaction, so for reads only): `(node "host:port", success, result)`.
pub fn read_on_workers(query: &str) -> Result<Vec<(String, bool, String)>> {
    Spi::connect(|c| -> pgrx::spi::SpiResult<Vec<(String, bool, String)>> {
        let mut v = Vec::new();
        for r in c.select(
            "SELECT nodename || ':' || nodeport, success, result FROM pg_catalog.run_command_on_workers($1) ORDER BY 1",
            None,
            &[query.into()],
        )? {
            v.push((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<bool>(2)?.unwrap_or(false),
                r.get::<String>(3)?.unwrap_or_default(),
            ));
        }
        Ok(v)
    })
    .map_err(crate::pg::spi::err)
}

/// Whether worker node `node` ("host:port", as `read_on_workers` names it)
/// answers a connection from here (Citus's own connectivity check).
pub fn reachable(node: &str) -> Result<bool> {
    let Some((host, port)) = node.rsplit_once(':') else {
        return Ok(false);
    };
    let Ok(port) = port.parse::<i32>() else {
        return Ok(false);
    };
    Ok(crate::pg::spi::one::<bool>(
        "SELECT pg_catalog.citus_check_connection_to_node($1, $2)",
        vec![host.into(), port.into()],
    )?
    .unwrap_or(false))
}

/// Whether table `tbl` is a Citus table (distributed, reference, or a local
/// table added to Citus's metadata): its rows are in shards.
pub fn is_citus_table(tbl: pg_sys::Oid) -> Result<bool> {
    if !has_citus()? {
        return Ok(false);
    }
    Ok(crate::pg::spi::one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition WHERE logicalrelid OPERATOR(pg_catalog.=) $1)",
        vec![tbl.into()],
    )?
    .unwrap_or(false))
}

/// The Citus tables of this database (none without Citus).
pub fn citus_tables() -> Result<Vec<pg_sys::Oid>> {
    if !has_citus()? {
        return Ok(Vec::new());
    }
    Ok(crate::pg::spi::one::<Vec<pg_sys::Oid>>(
        "SELECT coalesce(array_agg(logicalrelid::pg_catalog.oid), '{}') FROM pg_catalog.pg_dist_partition",
        vec![],
    )?
    .unwrap_or_default())
}
