//! Starting jobs: the switch to a new key (`ekm_rotate`, automatic
//! rotation), the job and its cursors, registering partitions attached
//! since (and refusing relations ekm cannot rotate), sizing batches, and
//! superseding an unfinished job. docs/design.md, section 5, step 1.

use crate::keys::catalog;
use crate::keys::lifecycle::{activate, create_key, lock_key_changes};
use crate::pg::error::{internal, raise_with};
use crate::pg::gucs;
use crate::pg::owner::{self, as_owner};
use crate::pg::spi;
use crate::pg::time::ts_to_chrono;
use ekm_core::{EkmError, KeyState};
use pgrx::prelude::*;

type EkmResult<T> = ekm_core::Result<T>;

/// Rows per second per column that the dry run's estimate assumes (measured
/// with bench/, 2 cores; see README).
pub const ESTIMATE_ROWS_PER_SECOND: f64 = 50_000.0;

pub fn check_batch_size(batch_size: i32) {
    if batch_size < 1 {
        raise_with(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("batch_size must be at least 1, not {batch_size}"),
            Some("batch_size is the number of rows per batch transaction; the default, 1000, suits most tables".into()),
        );
    }
}

/// Refuses while a job runs. A cancelled job is refused too unless `force`,
/// in which case it is marked failed, superseded by `by`. As the owner.
pub fn supersede_unfinished(force: bool, by: &str) -> EkmResult<()> {
    let Some((j, state)) =
        first_job("WHERE state IN ('running', 'cancelled', 'needs_attention') AND kind <> 'scan'")?
    else {
        return Ok(());
    };
    if state == "running" {
        raise_with(
            PgSqlErrorCode::ERRCODE_OBJECT_IN_USE,
            format!("rotation job {j} is already running"),
            Some(format!("follow it with SELECT * FROM ekm.rotation_progress or SELECT ekm_rotation_wait({j}); stop it with SELECT ekm_rotation_cancel({j})")),
        );
    }
    let how = if state == "needs_attention" {
        "needs attention: some values could not be moved (SELECT * FROM ekm.rotation_problem)"
    } else {
        "was cancelled before it finished"
    };
    if !force {
        raise_with(
            PgSqlErrorCode::ERRCODE_OBJECT_IN_USE,
            format!("rotation job {j} {how}"),
            Some(if by == "a column encryption" {
                // ekm_encrypt_column has no force: the job is finished first
                format!(
                    "finish it first with SELECT ekm_rotation_resume({j}), then encrypt the column"
                )
            } else {
                format!("finish it with SELECT ekm_rotation_resume({j}), or start {by} with force => true")
            }),
        );
    }
    spi::exec(
        "UPDATE ekm.rotation_job SET state = 'failed', error = $2, finished_at = now() WHERE job_id = $1",
        vec![j.into(), format!("superseded by {by}").into()],
    )?;
    pgrx::notice!(
        "ekm: unfinished job {j} ({state}) is superseded by {by}; its values are on keys that still decrypt and the new job moves them"
    );
    Ok(())
}

/// The active key, where it stands against the policy, and its encryptions
/// (stored plus those still in shared memory; on a Citus coordinator, plus
/// every worker node's). As the owner.
pub fn active_key_age() -> EkmResult<(String, ekm_core::lifecycle::KeyAge, i64)> {
    let (active, created, stored) = spi::three::<String, TimestampWithTimeZone, i64>(
        "SELECT key_id, created_at, encryptions FROM ekm.key WHERE rotation_status = 'active'",
        vec![],
    )?;
    let active = active.ok_or(EkmError::NoActiveKey)?;
    let created = ts_to_chrono(created.expect("not null"));
    let pending = ekm_core::KeyId::parse(&active)
        .map(|k| crate::keys::shmem::pending(&k.to_ref()))
        .unwrap_or(0) as i64;
    let encryptions =
        stored.unwrap_or(0) + pending + crate::keys::cluster::worker_encryptions(&active)?;
    let age = gucs::policy().evaluate(created, chrono::Utc::now(), encryptions);
    Ok((active, age, encryptions))
}

/// Creates a key, makes it active (the active key turns `rotating`) and
/// records the rotation job that moves the data. As the owner.
pub fn switch_to_new_key(
    from: &str,
    batch_size: i32,
    requested_by: &str,
    detail: &[(&str, &str)],
) -> EkmResult<(i64, ekm_core::KeyId)> {
    let new_key = create_key(KeyState::Created)?;
    activate(&new_key.to_string())?;
    let job = start_job(
        "rotate",
        Some(from),
        &new_key.to_string(),
        batch_size,
        requested_by,
        None,
        detail,
    )?;
    Ok((job, new_key))
}

/// Records a job and its cursors (every registered column, or just `only`)
/// and audits `<kind>_started`. As the owner; the caller launches the worker.
pub fn start_job(
    kind: &str,
    from_key: Option<&str>,
    to_key: &str,
    batch_size: i32,
    requested_by: &str,
    only: Option<(pg_sys::Oid, &str)>,
    detail: &[(&str, &str)],
) -> EkmResult<i64> {
    let job = spi::one_mut::<i64>(
        "INSERT INTO ekm.rotation_job (kind, from_key, to_key, batch_size, requested_by) VALUES ($1, $2, $3, $4, $5) RETURNING job_id",
        vec![kind.into(), from_key.into(), to_key.into(), batch_size.into(), requested_by.into()],
    )?
    .expect("returning");
    sync_partitions()?;
    add_cursors(job, batch_size, only)?;
    let job_s = job.to_string();
    let bs = batch_size.to_string();
    let mut fields: Vec<(&str, &str)> = vec![
        ("job_id", &job_s),
        ("from_key", from_key.unwrap_or("plaintext")),
        ("to_key", to_key),
        ("batch_size", &bs),
        ("requested_by", requested_by),
    ];
    fields.extend_from_slice(detail);
    let event = match kind {
        "encrypt" => "column_encryption_started",
        "rollback" => "rollback_started",
        _ => "rotation_started",
    };
    catalog::audit(event, Some(to_key), &catalog::json_object(&fields))?;
    Ok(job)
}

/// Registers the partitions and inheritance children (at any depth) of
/// every registered table that are not registered yet, with the table's
/// context (`parent` names it), and forgets registrations of partitions
/// that were dropped (their values went with them). A partition detached
/// since keeps its registration. As the owner of ekm's tables; how many
/// partitions were registered.
pub fn sync_partitions() -> EkmResult<i64> {
    spi::exec(
        "DELETE FROM ekm.registered_column r WHERE r.parent IS NOT NULL \
           AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = r.tbl)",
        vec![],
    )?;
    refuse_rows_stored_elsewhere()?;
    refuse_owner_without_privileges()?;
    // partitions first: a partitioned Citus table's partitions are Citus
    // tables whose placements the next call registers
    let partitions = spi::one_mut::<i64>(
        "WITH RECURSIVE tree AS ( \
           SELECT r.tbl::oid AS root, r.col, r.context, r.registered_by, i.inhrelid AS rel \
           FROM ekm.registered_column r JOIN pg_catalog.pg_inherits i ON i.inhparent = r.tbl \
           WHERE r.parent IS NULL \
           UNION \
           SELECT t.root, t.col, t.context, t.registered_by, i.inhrelid FROM tree t JOIN pg_catalog.pg_inherits i ON i.inhparent = t.rel), \
         ins AS (INSERT INTO ekm.registered_column (tbl, col, context, registered_by, parent) \
           SELECT t.rel::regclass, t.col, t.context, t.registered_by, t.root::regclass FROM tree t \
           WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a WHERE a.attrelid = t.rel AND a.attname = t.col AND NOT a.attisdropped) \
           ON CONFLICT (tbl, col) DO NOTHING RETURNING 1) \
         SELECT count(*) FROM ins",
        vec![],
    )?
    .unwrap_or(0);
    Ok(partitions + sync_shard_placements()?)
}

/// On a node of a Citus cluster: registers the shard placements this node
/// holds of every registered Citus table (distributed or reference, and
/// the partitions of a partitioned one, registered with it), with the
/// table's column and context (`parent` names the registered Citus table:
/// the partitioned one for its partitions' placements), and forgets
/// registrations of placements no longer here (moved away, or the table
/// undistributed): the node's jobs rotate and check exactly the placements
/// it holds (docs/design.md, section 9). How many it registered.
fn sync_shard_placements() -> EkmResult<i64> {
    if crate::pg::citus::citus_tables()?.is_empty() {
        return Ok(0);
    }
    // each placement here with the registration of its Citus table
    // (`top`: the table registered by itself, whose partition it may be)
    const HERE: &str = "WITH here AS ( \
           SELECT pg_catalog.to_regclass(pg_catalog.shard_name(s.logicalrelid, s.shardid, false))::oid AS rel, \
                  coalesce(r.parent, r.tbl)::oid AS top, r.col, r.context, r.registered_by \
           FROM pg_catalog.pg_dist_shard s JOIN pg_catalog.pg_dist_placement p ON p.shardid = s.shardid \
           JOIN ekm.registered_column r ON r.tbl::oid = s.logicalrelid::oid \
           WHERE p.groupid = (SELECT groupid FROM pg_catalog.pg_dist_local_group))";
    spi::exec(
        &format!(
            "{HERE} DELETE FROM ekm.registered_column r \
             WHERE r.parent::oid IN (SELECT logicalrelid::oid FROM pg_catalog.pg_dist_partition) \
               AND r.tbl::oid NOT IN (SELECT logicalrelid::oid FROM pg_catalog.pg_dist_partition) \
               AND NOT EXISTS (SELECT 1 FROM here h WHERE h.rel = r.tbl::oid AND h.top = r.parent::oid AND h.col = r.col)"
        ),
        vec![],
    )?;
    Ok(spi::one_mut::<i64>(
        &format!(
            "{HERE}, ins AS (INSERT INTO ekm.registered_column (tbl, col, context, registered_by, parent) \
               SELECT h.rel::regclass, h.col, h.context, h.registered_by, h.top::regclass FROM here h \
               WHERE h.rel IS NOT NULL \
               ON CONFLICT (tbl, col) DO NOTHING RETURNING 1) \
             SELECT count(*) FROM ins"
        ),
        vec![],
    )?
    .unwrap_or(0))
}

/// Refuses (42809) while a registered table has a partition or inheritance
/// child, at any depth, that does not store its rows in this database's
/// own tables (a foreign table), or while a relation registered in
/// ekm.registered_column is not a table: ekm's batches and checks cannot
/// read or write it, and a job that skipped it would retire a key its
/// values are still on. Runs at registration, at the start of every job and
/// in every settle step, and again under the key-change lock before a
/// retire (sync_partitions), so a foreign partition attached at any time
/// fails the job instead of letting it end `done`.
fn refuse_rows_stored_elsewhere() -> EkmResult<()> {
    let (member, root, partition) = spi::three::<pg_sys::Oid, pg_sys::Oid, bool>(
        "WITH RECURSIVE tree AS ( \
           SELECT r.tbl::oid AS root, i.inhrelid AS rel FROM ekm.registered_column r \
           JOIN pg_catalog.pg_inherits i ON i.inhparent = r.tbl WHERE r.parent IS NULL \
           UNION \
           SELECT t.root, i.inhrelid FROM tree t JOIN pg_catalog.pg_inherits i ON i.inhparent = t.rel), \
         m AS (SELECT rel, root FROM tree UNION ALL SELECT r.tbl::oid, coalesce(r.parent, r.tbl)::oid FROM ekm.registered_column r) \
         SELECT m.rel, m.root, c.relispartition FROM m JOIN pg_catalog.pg_class c ON c.oid = m.rel \
         WHERE c.relkind NOT IN ('r', 'p') ORDER BY m.root, m.rel LIMIT 1",
        vec![],
    )?;
    let (Some(member), Some(root)) = (member, root) else {
        return Ok(());
    };
    let kind = owner::Table::lookup(member).map_or("a relation", |t| t.kind_name());
    Err(EkmError::NotStoredHere {
        member: owner::display_name(member),
        kind,
        how: if member == root {
            "registered in"
        } else if partition.unwrap_or(false) {
            "a partition of"
        } else {
            "an inheritance child of"
        },
        table: if member == root {
            "ekm.registered_column".into()
        } else {
            owner::display_name(root)
        },
    })
}

/// Refuses (42501) while the owner of a registered table may not read and
/// update what ekm's batches read and update as that owner: the column
/// (SELECT, UPDATE) and the row addresses (SELECT on `ctid`), e.g. after
/// `REVOKE ALL ON t FROM owner` left it column privileges only. Checked
/// with every sync (registration, the start of each job, every settle step,
/// the final step), so such a table is refused up front or fails the job
/// before a key is retired, never skipped.
fn refuse_owner_without_privileges() -> EkmResult<()> {
    let (tbl, col, owner) = spi::three::<pg_sys::Oid, String, String>(
        "SELECT r.tbl::oid, r.col::text, pg_catalog.pg_get_userbyid(c.relowner)::text \
         FROM ekm.registered_column r JOIN pg_catalog.pg_class c ON c.oid = r.tbl \
         JOIN pg_catalog.pg_attribute a ON a.attrelid = r.tbl AND a.attname = r.col AND NOT a.attisdropped \
         WHERE c.relkind = 'r' \
           AND NOT (pg_catalog.has_column_privilege(c.relowner, r.tbl, a.attnum, 'SELECT') \
                    AND pg_catalog.has_column_privilege(c.relowner, r.tbl, a.attnum, 'UPDATE') \
                    AND pg_catalog.has_column_privilege(c.relowner, r.tbl, (-1)::pg_catalog.int2, 'SELECT')) \
         ORDER BY r.tbl::oid, r.col LIMIT 1",
        vec![],
    )?;
    let (Some(tbl), Some(col), Some(owner)) = (tbl, col, owner) else {
        return Ok(());
    };
    let name = owner::display_name(tbl);
    let (q_owner, q_col) = (owner::quote_ident(&owner), owner::quote_ident(&col));
    raise_with(
        PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
        format!(
            "{owner}, the owner of {name}, may not read and update {name}.{q_col}: ekm reads and rewrites registered columns as the table's owner"
        ),
        Some(format!(
            "grant them back (GRANT SELECT, UPDATE ON {name} TO {q_owner}, or at least GRANT SELECT (ctid, {q_col}), UPDATE ({q_col}) ON {name} TO {q_owner}); nothing was registered or retired"
        )),
    )
}

/// Gives every registered column of an ordinary table (partitioned tables
/// hold no rows: their partitions are registered tables of their own) that
/// has no cursor in job `job` one (with `only`, just that registration and
/// its partitions). Batches cover `batch_size` rows: the blocks per batch
/// come from the table's row density (sampled for a table never analyzed).
/// As the owner of ekm's tables; how many cursors were added.
pub fn add_cursors(job: i64, batch_size: i32, only: Option<(pg_sys::Oid, &str)>) -> EkmResult<i64> {
    let (tbl, col) = only.map_or((None, None), |(t, c)| (Some(t), Some(c.to_string())));
    let added = spi::one_mut::<i64>(
        "WITH a AS (INSERT INTO ekm.rotation_cursor (job_id, tbl, col, context, blocks_total, blocks_per_batch, rows_total, \
                                                   heap_bytes_before, toast_bytes_before) \
           SELECT $1, r.tbl, r.col, r.context, \
                  pg_relation_size(r.tbl) / current_setting('block_size')::bigint, \
                  CASE WHEN c.reltuples < 0 THEN 1 \
                       ELSE greatest(1, ($2::float8 / greatest(1.0, c.reltuples / greatest(c.relpages, 1)))::int) END, \
                  greatest(c.reltuples, 0)::bigint, \
                  pg_relation_size(r.tbl), coalesce(pg_total_relation_size(nullif(c.reltoastrelid, 0)), 0) \
           FROM ekm.registered_column r JOIN pg_catalog.pg_class c ON c.oid = r.tbl \
           WHERE c.relkind = 'r' AND NOT (r.tbl::oid = ANY ($5::oid[])) \
             AND ($3::oid IS NULL OR ((r.tbl = $3::oid OR r.parent = $3::oid) AND r.col = $4)) \
             AND NOT EXISTS (SELECT 1 FROM ekm.rotation_cursor x WHERE x.job_id = $1 AND x.tbl = r.tbl AND x.col = r.col) \
           RETURNING tbl) \
         SELECT count(*) FROM a",
        // (a Citus table's rows are in its shard placements: those have
        // cursors, on the nodes that hold them)
        vec![job.into(), batch_size.into(), tbl.into(), col.into(), crate::pg::citus::citus_tables()?.into()],
    )?
    .unwrap_or(0);
    size_batches(job, batch_size)?;
    Ok(added)
}

/// Tables never analyzed (reltuples < 0) have no row density: for the
/// job's cursors that have not started, the first blocks are sampled (as the
/// table's owner), or a batch would span batch_size blocks instead of rows.
pub fn size_batches(job: i64, batch_size: i32) -> EkmResult<()> {
    let unknown = Spi::connect(|c| -> pgrx::spi::SpiResult<Vec<(pg_sys::Oid, i64)>> {
        let mut v = Vec::new();
        for r in c.select(
            "SELECT DISTINCT c.tbl::oid, c.blocks_total FROM ekm.rotation_cursor c JOIN pg_catalog.pg_class p ON p.oid = c.tbl \
             WHERE c.job_id = $1 AND p.reltuples < 0 AND c.blocks_total > 0 AND c.rows_done = 0 AND c.passes = 1 AND c.next_block = 0",
            None,
            &[job.into()],
        )? {
            v.push((r.get::<pg_sys::Oid>(1)?.unwrap_or_default(), r.get::<i64>(2)?.unwrap_or(0)));
        }
        Ok(v)
    })
    .map_err(internal)?;
    for (t, blocks) in unknown {
        let sample = blocks.min(32);
        // read as the table's owner, like every statement on an application table
        let table = owner::Table::require(t)?;
        let rows = table
            .as_owner(|| {
                spi::one::<i64>(
                    &format!(
                        "SELECT pg_catalog.count(*) FROM ONLY {} WHERE ctid OPERATOR(pg_catalog.<) $1::pg_catalog.tid",
                        table.qualified
                    ),
                    vec![format!("({sample},0)").into()],
                )
            })?
            .unwrap_or(0);
        let per_block = (rows as f64 / sample as f64).max(1.0);
        spi::exec(
            "UPDATE ekm.rotation_cursor SET blocks_per_batch = greatest(1, ($3::float8 / $4::float8)::int), \
                    rows_total = ($4::float8 * blocks_total)::bigint \
             WHERE job_id = $1 AND tbl = $2::regclass AND rows_done = 0 AND passes = 1 AND next_block = 0",
            vec![job.into(), t.into(), (batch_size as f64).into(), per_block.into()],
        )?;
    }
    Ok(())
}

/// Automatic rotation (the launcher's check in one database): starts a
/// rotation when the active key is due, exactly as `ekm_rotate()` would, and
/// returns its job. `None`, with the reason, when nothing is to be done.
pub fn auto_rotate() -> EkmResult<Result<i64, String>> {
    let (_, owner) = catalog::ekm_tables()?;
    as_owner(owner, || {
        lock_key_changes()?;
        if let Some((j, state)) = first_job(
            "WHERE state IN ('running', 'cancelled', 'needs_attention') AND kind <> 'scan'",
        )? {
            return Ok(Err(format!("job {j} is {state}")));
        }
        if last_rollback_job()?.is_some() {
            return Ok(Err(
                "the last key change was a rollback; automatic rotation waits for the next manual ekm_rotate()".into(),
            ));
        }
        let registered =
            spi::one::<i64>("SELECT count(*) FROM ekm.registered_column", vec![])?.unwrap_or(0);
        let (active, age, _) = active_key_age()?;
        if !age.needs_rotation {
            return Ok(Err(format!("active key {active} is not due")));
        }
        if registered == 0 {
            return Ok(Err(format!(
                "active key {active} is due, but no column is registered for rotation"
            )));
        }
        let (job, _) = switch_to_new_key(
            &active,
            1000,
            "ekm auto-rotation",
            &[
                ("automatic", "true"),
                ("age_days", &age.age_days.to_string()),
            ],
        )?;
        Ok(Ok(job))
    })
}

pub fn first_job(filter: &str) -> EkmResult<Option<(i64, String)>> {
    let (j, s) = spi::two::<i64, String>(
        &format!("SELECT job_id, state FROM ekm.rotation_job {filter}"),
        vec![],
    )?;
    Ok(j.zip(s))
}

/// The job of the last key change (rotation or rollback), if that was a
/// rollback: automatic rotation waits for a manual ekm_rotate() after it.
pub fn last_rollback_job() -> EkmResult<Option<i64>> {
    let (job, kind) = spi::two::<i64, String>(
        "SELECT job_id, kind FROM ekm.rotation_job WHERE kind IN ('rotate', 'rollback') ORDER BY job_id DESC LIMIT 1",
        vec![],
    )?;
    Ok(job.filter(|_| kind.as_deref() == Some("rollback")))
}
