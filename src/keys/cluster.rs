//! One key catalog for a Citus cluster (docs/design.md, section 9): the
//! coordinator's keys (metadata and wrapped material) are copied to every
//! worker node in the same distributed transaction as each change, so no
//! node ever encrypts with a key another node cannot decrypt; a worker
//! node applies what it receives; each node's state can be compared.
//! Only the key rows travel: wrapped under the master key, they are useless
//! without it, and every node loads the same master key from its own
//! configuration. Encryption counts stay per node.

use crate::keys::{catalog, keycache, masterkey, shmem};
use crate::pg::citus::{self, Node};
use crate::pg::owner::as_owner;
use crate::pg::spi;
use ekm_core::{EkmError, KeyId, KeyState, Result};
use pgrx::prelude::*;

thread_local! {
    /// The top-level transaction whose key changes were sent to the worker
    /// nodes (one snapshot per transaction, taken when its deferred
    /// triggers fire at commit, after every change).
    static SENT_IN: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    /// Set while a worker node applies the coordinator's catalog: its own
    /// refusal of key changes on a worker node does not apply to it.
    static APPLYING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this backend is applying the coordinator's catalog now.
pub fn applying() -> bool {
    APPLYING.with(|a| a.get())
}

/// Runs `f` as an application of the coordinator's catalog (or
/// registrations): the refusals of local changes on a worker node do not
/// apply to it.
pub fn while_applying<R>(f: impl FnOnce() -> Result<R>) -> Result<R> {
    APPLYING.with(|a| a.set(true));
    let r = f();
    APPLYING.with(|a| a.set(false));
    r
}

/// Every key row, material included, as one JSON array (as ekm's owner).
fn snapshot(owner: pg_sys::Oid) -> Result<String> {
    as_owner(owner, || {
        spi::one::<String>(
            "SELECT coalesce(jsonb_agg(jsonb_build_object( \
                 'key_id', k.key_id, 'kind', k.kind, 'rotation_status', k.rotation_status, 'bootstrap', k.bootstrap, \
                 'created_at', k.created_at, 'activated_at', k.activated_at, 'rotated_at', k.rotated_at, \
                 'retired_at', k.retired_at, 'destroyed_at', k.destroyed_at, \
                 'wrapped', encode(m.wrapped, 'hex'), 'master_kcv', encode(m.master_kcv, 'hex')) ORDER BY k.key_id), '[]')::text \
             FROM ekm.key k LEFT JOIN ekm.key_material m USING (key_id)",
            vec![],
        )
    })
    .map(|s| s.unwrap_or_else(|| "[]".into()))
}

/// Sends the whole catalog to every worker node, in this transaction (on
/// the coordinator of a Citus cluster; elsewhere nothing). With `once`,
/// at most once per transaction (the key tables' deferred trigger fires per
/// row changed). How many worker nodes there are (0: not a coordinator).
pub fn propagate(once: bool) -> Result<i64> {
    if citus::node()? != Node::Coordinator {
        return Ok(0);
    }
    let xid = unsafe { pg_sys::GetTopTransactionIdIfAny() }.into_inner();
    if once && xid != 0 && SENT_IN.with(|s| s.get()) == xid {
        return Ok(0);
    }
    let (_, owner) = catalog::key_table()?;
    let json = snapshot(owner)?;
    let command = spi::one::<String>(
        "SELECT pg_catalog.format('SELECT ekm._ekm_cluster_apply(%L::jsonb)', $1::text)",
        vec![json.into()],
    )?
    .unwrap_or_default();
    citus::run_on_workers(&command)?;
    SENT_IN.with(|s| s.set(xid));
    Ok(spi::one::<i64>(
        "SELECT count(*) FROM pg_catalog.pg_dist_node WHERE groupid OPERATOR(pg_catalog.<>) 0 AND isactive \
           AND noderole OPERATOR(pg_catalog.=) 'primary' AND hasmetadata",
        vec![],
    )?
    .unwrap_or(0))
}

/// Registering (or unregistering) a column of Citus table `name` on this
/// node: refused on a worker node (the coordinator registers Citus tables
/// and sends the registration to every node).
pub fn refuse_citus_registration_here(name: &str) -> Result<()> {
    if applying() {
        return Ok(());
    }
    if citus::node()? == Node::Worker {
        crate::pg::error::raise_with(
            pgrx::PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("{name} is a Citus table and this is a worker node: its columns are registered on the coordinator"),
            Some("run ekm_register_column (or ekm_unregister_column) on the coordinator; it registers the shard placements on every node".into()),
        );
    }
    Ok(())
}

/// On the coordinator: sends the registrations of Citus tables (table,
/// column, context) to every worker node, in this transaction (two-phase
/// commit with it); each node registers the shard placements it holds.
pub fn propagate_registrations() -> Result<()> {
    if citus::node()? != Node::Coordinator {
        return Ok(());
    }
    let command = spi::one::<String>(
        "SELECT pg_catalog.format('SELECT ekm._ekm_cluster_register(%L::jsonb)', coalesce(jsonb_agg(jsonb_build_object( \
                 'table', pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname), \
                 'col', r.col, 'context', r.context, 'registered_by', r.registered_by) ORDER BY n.nspname, c.relname, r.col), '[]')::text) \
         FROM ekm.registered_column r JOIN pg_catalog.pg_class c ON c.oid = r.tbl JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE r.parent IS NULL AND r.tbl::oid IN (SELECT logicalrelid::oid FROM pg_catalog.pg_dist_partition)",
        vec![],
    )?
    .unwrap_or_default();
    citus::run_on_workers(&command)
}

struct Incoming {
    id: String,
    kind: String,
    state: KeyState,
    row: serde_json::Value,
}

/// On a worker node: makes its catalog the coordinator's `catalog` (a
/// [`snapshot`]). Keys it does not have are added; its keys move through
/// the lifecycle states to the coordinator's (audited on this node like
/// any transition); a key of its own that the coordinator does not have
/// is removed if it never encrypted anything (the unused first key of a
/// node that had ekm before it joined), else the whole transaction is
/// refused: this node holds values the cluster's keys cannot decrypt.
///
/// `on_retire` is called with the keys that go from rotating to retired
/// (before they do): it refuses (an ERROR) while this node has not verified
/// its part of the rotation (jobs::node::retire_here).
pub fn apply(
    catalog_json: pgrx::JsonB,
    on_retire: &dyn Fn(&[String]) -> Result<()>,
) -> Result<i64> {
    if citus::node()? != Node::Worker {
        crate::pg::error::raise_with(
            pgrx::PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "ekm._ekm_cluster_apply runs only on a Citus worker node".into(),
            Some("the coordinator sends its keys with every key change, or with SELECT ekm_cluster_sync()".into()),
        );
    }
    let rows = match &catalog_json.0 {
        serde_json::Value::Array(a) => a.clone(),
        _ => {
            return Err(EkmError::Internal(
                "the coordinator's key catalog is not a JSON array".into(),
            ))
        }
    };
    let mut incoming = Vec::new();
    for r in rows {
        let field = |k: &str| {
            r.get(k)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string()
        };
        incoming.push(Incoming {
            id: field("key_id"),
            kind: field("kind"),
            state: field("rotation_status").parse()?,
            row: r.clone(),
        });
    }
    let (_, owner) = catalog::key_table()?;
    APPLYING.with(|a| a.set(true));
    let r = as_owner(owner, || apply_rows(&incoming, on_retire));
    APPLYING.with(|a| a.set(false));
    keycache::invalidate_all();
    r
}

fn apply_rows(incoming: &[Incoming], on_retire: &dyn Fn(&[String]) -> Result<()>) -> Result<i64> {
    // serialized with this node's other key changes (its own rotation's
    // final step, say)
    crate::keys::locks::lock_xact(
        crate::keys::locks::EkmLock::KeyChange,
        "apply the coordinator's key catalog",
    );
    // this node's keys: (id, state, encryptions, bootstrap)
    let local = Spi::connect_mut(|c| -> pgrx::spi::SpiResult<Vec<(String, String, i64, bool)>> {
        let mut v = Vec::new();
        for r in c.update(
            "SELECT key_id, rotation_status, encryptions, bootstrap FROM ekm.key ORDER BY key_id FOR UPDATE",
            None,
            &[],
        )? {
            v.push((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<String>(2)?.unwrap_or_default(),
                r.get::<i64>(3)?.unwrap_or(0),
                r.get::<bool>(4)?.unwrap_or(false),
            ));
        }
        Ok(v)
    })
    .map_err(spi::err)?;
    // keys of its own
    for (id, _, encryptions, bootstrap) in &local {
        if incoming.iter().any(|k| &k.id == id) {
            continue;
        }
        let pending = KeyId::parse(id)
            .map(|k| shmem::pending(&k.to_ref()))
            .unwrap_or(0);
        if !*bootstrap || *encryptions > 0 || pending > 0 {
            crate::pg::error::raise_with(
                pgrx::PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!(
                    "this worker node has key {id} of its own, which the coordinator does not have and which may hold values: \
                     it cannot take the coordinator's keys"
                ),
                Some("move this node's values off its own keys (or drop and recreate ekm on it) before it joins the cluster; nothing changed on any node".into()),
            );
        }
        spi::exec(
            "DELETE FROM ekm.key_material WHERE key_id = $1",
            vec![id.clone().into()],
        )?;
        spi::exec(
            "DELETE FROM ekm.key WHERE key_id = $1",
            vec![id.clone().into()],
        )?;
    }
    // keys that retire now: only if this node verified its part of the
    // rotation (docs/design.md, section 9)
    let retiring: Vec<String> = incoming
        .iter()
        .filter(|k| {
            k.state == KeyState::Retired
                && local
                    .iter()
                    .any(|l| l.0 == k.id && l.1 == KeyState::Rotating.as_str())
        })
        .map(|k| k.id.clone())
        .collect();
    on_retire(&retiring)?;
    refuse_material_not_loaded(incoming)?;
    // the coordinator's keys: every one that is not to be active first (the
    // node's active key may be one that is rotating now), then the active one
    let mut order: Vec<&Incoming> = incoming.iter().collect();
    order.sort_by_key(|k| k.state == KeyState::Active);
    for k in order {
        let have = local.iter().find(|l| l.0 == k.id).map(|l| l.1.clone());
        match have {
            None => {
                // (an active key inserted here takes over from no other:
                // the node's own are gone or no longer active)
                spi::exec(
                    "INSERT INTO ekm.key (key_id, kind, rotation_status, bootstrap, created_at, activated_at, rotated_at, retired_at, destroyed_at) \
                     SELECT r.key_id, r.kind, r.rotation_status, r.bootstrap, r.created_at, r.activated_at, r.rotated_at, r.retired_at, r.destroyed_at \
                     FROM jsonb_to_record($1) AS r(key_id text, kind text, rotation_status text, bootstrap boolean, created_at timestamptz, \
                          activated_at timestamptz, rotated_at timestamptz, retired_at timestamptz, destroyed_at timestamptz)",
                    vec![pgrx::JsonB(k.row.clone()).into()],
                )?;
                catalog::audit(
                    "key_received",
                    Some(&k.id),
                    &catalog::json_object(&[
                        ("from", "citus coordinator"),
                        ("state", k.state.as_str()),
                        ("kind", &k.kind),
                    ]),
                )?;
            }
            Some(state) => {
                let from: KeyState = state.parse()?;
                let path = from.path_to(k.state).ok_or(EkmError::InvalidTransition {
                    key_id: k.id.clone(),
                    from,
                    to: k.state,
                })?;
                for s in path {
                    spi::exec(
                        "UPDATE ekm.key SET rotation_status = $2 WHERE key_id = $1",
                        vec![k.id.clone().into(), s.as_str().into()],
                    )?;
                }
                spi::exec(
                    "UPDATE ekm.key k SET activated_at = r.activated_at, rotated_at = r.rotated_at, retired_at = r.retired_at, \
                            destroyed_at = r.destroyed_at, bootstrap = r.bootstrap \
                     FROM jsonb_to_record($2) AS r(activated_at timestamptz, rotated_at timestamptz, retired_at timestamptz, \
                          destroyed_at timestamptz, bootstrap boolean) \
                     WHERE k.key_id = $1 AND (k.activated_at, k.rotated_at, k.retired_at, k.destroyed_at, k.bootstrap) \
                           IS DISTINCT FROM (r.activated_at, r.rotated_at, r.retired_at, r.destroyed_at, r.bootstrap)",
                    vec![k.id.clone().into(), pgrx::JsonB(k.row.clone()).into()],
                )?;
            }
        }
        spi::exec(
            "INSERT INTO ekm.key_material (key_id, wrapped, master_kcv) \
             SELECT $1, decode(r.wrapped, 'hex'), decode(r.master_kcv, 'hex') FROM jsonb_to_record($2) AS r(wrapped text, master_kcv text) \
             ON CONFLICT (key_id) DO UPDATE SET wrapped = excluded.wrapped, master_kcv = excluded.master_kcv \
             WHERE (key_material.wrapped, key_material.master_kcv) IS DISTINCT FROM (excluded.wrapped, excluded.master_kcv)",
            vec![k.id.clone().into(), pgrx::JsonB(k.row.clone()).into()],
        )?;
    }
    Ok(incoming.len() as i64)
}

/// Key material that is new here, or wrapped again (the coordinator's
/// master key was rotated), must be wrapped under the master key this node
/// loads, or the previous one it is configured with: else this node could
/// not use the keys, and it refuses them (the coordinator's whole change
/// rolls back on every node, in its distributed transaction).
fn refuse_material_not_loaded(incoming: &[Incoming]) -> Result<()> {
    let mut loaded: Option<(String, Option<String>)> = None;
    for k in incoming {
        // (a destroyed key keeps its check value, not its material)
        let wrapped = k.row.get("wrapped").and_then(|v| v.as_str());
        let kcv = k.row.get("master_kcv").and_then(|v| v.as_str());
        let (Some(_), Some(kcv)) = (wrapped, kcv) else {
            continue;
        };
        let here = spi::one::<String>(
            "SELECT encode(master_kcv, 'hex') FROM ekm.key_material WHERE key_id = $1",
            vec![k.id.clone().into()],
        )?;
        if here.as_deref() == Some(kcv) {
            continue;
        }
        if loaded.is_none() {
            let current = masterkey::load()?.fingerprint();
            let previous = masterkey::load_previous()
                .and_then(|r| r.ok())
                .map(|p| p.fingerprint());
            loaded = Some((current, previous));
        }
        let (current, previous) = loaded.as_ref().expect("loaded above");
        if kcv != current && previous.as_deref() != Some(kcv) {
            // this node as the coordinator names it
            let me = spi::one::<String>(
                "SELECT nodename || ':' || nodeport FROM pg_catalog.pg_dist_node \
                 WHERE groupid OPERATOR(pg_catalog.=) (SELECT groupid FROM pg_catalog.pg_dist_local_group) LIMIT 1",
                vec![],
            )?
            .unwrap_or_else(|| "this worker node".into());
            crate::pg::error::raise_with(
                pgrx::PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!(
                    "the coordinator's key {} is wrapped under master key {kcv}, which worker node {me} does not load (it loads {current}); it cannot take the key",
                    k.id
                ),
                Some(format!(
                    "configure master key {kcv} on this node (ekm.master_key_file or _command, and the one it replaces as ekm.previous_master_key_file or _command), SELECT pg_reload_conf(), then repeat the change on the coordinator; nothing changed on any node"
                )),
            );
        }
    }
    Ok(())
}

/// This node's catalog and whether it can use it, for the coordinator's
/// health check: `{"digest": ..., "keys": n, "unwrap": "ok" | why not}`.
/// The digest covers every key's id, kind, state and material (a hash of
/// it) and the master key check value.
pub fn state() -> Result<String> {
    let (_, owner) = catalog::key_table()?;
    let (digest, n) = as_owner(owner, || {
        spi::two::<String, i64>(
            "SELECT md5(coalesce(string_agg(k.key_id || ':' || k.kind || ':' || k.rotation_status || ':' \
                     || coalesce(encode(sha256(m.wrapped), 'hex'), '-') || ':' || coalesce(encode(m.master_kcv, 'hex'), '-'), ',' ORDER BY k.key_id), '')), \
                    count(*) \
             FROM ekm.key k LEFT JOIN ekm.key_material m USING (key_id)",
            vec![],
        )
    })?;
    let unwrap = match unwrap_all(owner) {
        Ok(None) => "ok".to_string(),
        Ok(Some(why)) => why,
        Err(e) => e.to_string(),
    };
    Ok(serde_json::json!({
        "digest": digest.unwrap_or_default(),
        "keys": n.unwrap_or(0),
        "unwrap": unwrap,
    })
    .to_string())
}

/// On a Citus coordinator, the encryptions the worker nodes made with key
/// `key_id` (each node's stored count plus what it has not flushed yet, as
/// its `ekm.keys` shows them): the 2^32 random-nonce bound is the key's,
/// across every node that encrypts with it. 0 elsewhere; a node that
/// cannot be asked adds nothing (ekm_health names it in its own check).
pub fn worker_encryptions(key_id: &str) -> Result<i64> {
    if citus::node()? != Node::Coordinator {
        return Ok(0);
    }
    let query = spi::one::<String>(
        "SELECT pg_catalog.format('SELECT coalesce(sum(encryptions), 0) FROM ekm.keys WHERE key_id = %L', $1::text)",
        vec![key_id.into()],
    )?
    .unwrap_or_default();
    Ok(citus::read_on_workers(&query)?
        .into_iter()
        .filter(|(_, ok, _)| *ok)
        .filter_map(|(_, _, n)| n.parse::<i64>().ok())
        .sum())
}

/// Whether every ekm key with material unwraps under the master key this
/// node loads (or the previous one, during a master key rotation): None,
/// else which one does not.
fn unwrap_all(owner: pg_sys::Oid) -> Result<Option<String>> {
    let master = masterkey::load()?;
    let previous = masterkey::load_previous().and_then(|r| r.ok());
    for row in catalog::load_keys(owner)? {
        let Some(w) = row.wrapped else { continue };
        let ok = master.unwrap(&row.id, &w, &row.kcv).is_ok()
            || previous
                .as_ref()
                .is_some_and(|p| p.unwrap(&row.id, &w, &row.kcv).is_ok());
        if !ok {
            return Ok(Some(format!(
                "key {} does not unwrap under the master key this node loads (fingerprint {})",
                row.id,
                master.fingerprint()
            )));
        }
    }
    Ok(None)
}
