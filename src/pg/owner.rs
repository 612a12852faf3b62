//! Who ekm acts as, and how it names relations. ekm's own tables are read
//! and written as their owner (`as_owner`, like a SECURITY DEFINER
//! function); application tables as *their* owner, security-restricted,
//! with SECURITY_NOFORCE_RLS (`as_table_owner`); the role that called into
//! ekm is remembered for the audit log. Also: relations ekm works on
//! (`Table`), their names as a caller writes them, quoting, and the
//! search_path the application's code gets in ekm's batches.

use crate::pg::spi::one;
use ekm_core::{EkmError, Result};
use pgrx::prelude::*;
use std::cell::Cell;

thread_local! {
    /// The role that called into ekm while we act as the owner, for the audit log.
    static ACTING_ROLE: Cell<Option<pg_sys::Oid>> = const { Cell::new(None) };
}

/// Runs `f` as `owner` with `search_path = pg_catalog, pg_temp`, restoring
/// the caller's identity and settings afterwards (also on error). For ekm's
/// own tables: like a SECURITY DEFINER function owned by ekm's owner.
pub fn as_owner<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    switch_identity(
        owner,
        pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        true,
        None,
        f,
    )
}

/// Runs `f` as `owner` of an application table the way VACUUM, ANALYZE and
/// REFRESH MATERIALIZED VIEW do: inside a security-restricted operation
/// (`SECURITY_RESTRICTED_OPERATION`: no SET ROLE, no temporary tables), in a
/// GUC nest level of its own with `search_path = pg_catalog, pg_temp`, whose
/// settings are discarded on exit. Triggers, constraints, index expressions
/// and generated columns of the table then run as its owner, never with the
/// rights of whoever runs ekm (a superuser, for the workers).
///
/// Row-level security: an owner is not subject to its table's policies
/// unless the table has FORCE ROW LEVEL SECURITY; `SECURITY_NOFORCE_RLS`
/// (what PostgreSQL's referential-integrity checks use) lifts FORCE for the
/// owner too, so every read and write ekm makes sees every row. Without it
/// a forced tenant policy hid rows from the batches and both checks, and a
/// job ended `done` with values still on the key it retired.
pub fn as_table_owner<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    switch_identity(
        owner,
        (pg_sys::SECURITY_RESTRICTED_OPERATION | pg_sys::SECURITY_NOFORCE_RLS) as i32,
        false,
        None,
        f,
    )
}

/// [`as_table_owner`] with `search_path` set to `path` (for the batches,
/// whose triggers and constraints are the application's code: see
/// [`batch_search_path`]).
pub fn as_table_owner_with_path<R>(owner: pg_sys::Oid, path: &str, f: impl FnOnce() -> R) -> R {
    switch_identity(
        owner,
        (pg_sys::SECURITY_RESTRICTED_OPERATION | pg_sys::SECURITY_NOFORCE_RLS) as i32,
        false,
        Some(path),
        f,
    )
}

/// Whether row-level security would still filter what the current user
/// reads from `tbl` (for a check that must see every row: false inside
/// [`as_table_owner`] unless PostgreSQL changed its rules).
pub fn row_security_active(tbl: pg_sys::Oid) -> Result<bool> {
    Ok(one::<bool>(
        "SELECT pg_catalog.row_security_active($1::pg_catalog.oid)",
        vec![tbl.into()],
    )?
    .unwrap_or(true))
}

/// The search_path the application's code of a table runs with in ekm's
/// batches: `ekm.batch_search_path` if set, else the one `owner` gets when
/// it logs in to this database (ALTER ROLE ... IN DATABASE ... SET, then
/// ALTER ROLE ... SET, then ALTER DATABASE ... SET, then ALTER ROLE ALL
/// SET, then the server's configuration file, then the built-in default), as
/// PostgreSQL applies them at login. ekm's own SQL in the batch is
/// schema-qualified and does not depend on it.
pub fn batch_search_path(owner: pg_sys::Oid) -> Result<String> {
    if let Some(p) = crate::pg::gucs::batch_search_path() {
        return Ok(p);
    }
    let server_default = SERVER_SEARCH_PATH.with(|d| d.borrow().clone());
    let server_default = match server_default {
        Some(d) => d,
        None => {
            // the configuration files' value (pg_file_settings is for
            // superusers, as the workers are); else the built-in default
            let sql = if unsafe { pg_sys::superuser() } {
                "SELECT coalesce((SELECT f.setting FROM pg_catalog.pg_file_settings f \
                                   WHERE f.name OPERATOR(pg_catalog.=) 'search_path' AND f.applied \
                                   AND f.error IS NULL ORDER BY f.seqno DESC LIMIT 1), \
                                  (SELECT s.boot_val FROM pg_catalog.pg_settings s WHERE s.name OPERATOR(pg_catalog.=) 'search_path'))"
            } else {
                "SELECT s.boot_val FROM pg_catalog.pg_settings s WHERE s.name OPERATOR(pg_catalog.=) 'search_path'"
            };
            let v = one::<String>(sql, vec![])?.unwrap_or_else(|| "\"$user\", public".into());
            SERVER_SEARCH_PATH.with(|d| *d.borrow_mut() = Some(v.clone()));
            v
        }
    };
    Ok(one::<String>(
        "SELECT coalesce(( \
             SELECT pg_catalog.substr(s.cfg, 13) FROM pg_catalog.pg_db_role_setting d, \
                    pg_catalog.unnest(d.setconfig) WITH ORDINALITY s(cfg, n) \
             WHERE d.setdatabase OPERATOR(pg_catalog.=) ANY (ARRAY[0, $2]::pg_catalog.oid[]) \
               AND d.setrole OPERATOR(pg_catalog.=) ANY (ARRAY[0, $1]::pg_catalog.oid[]) \
               AND s.cfg OPERATOR(pg_catalog.~~) 'search\\_path=%' \
             ORDER BY (d.setrole OPERATOR(pg_catalog.<>) 0) DESC, (d.setdatabase OPERATOR(pg_catalog.<>) 0) DESC, s.n DESC \
             LIMIT 1), $3)",
        vec![owner.into(), unsafe { pg_sys::MyDatabaseId }.into(), server_default.into()],
    )?
    .unwrap_or_default())
}

thread_local! {
    /// The configuration files' search_path, read once per worker (dropped
    /// at a configuration reload: [`forget_server_search_path`]).
    static SERVER_SEARCH_PATH: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Drops the cached server search_path (after a configuration reload).
pub fn forget_server_search_path() {
    SERVER_SEARCH_PATH.with(|d| *d.borrow_mut() = None);
}

fn switch_identity<R>(
    owner: pg_sys::Oid,
    flags: i32,
    keep_gucs: bool,
    path: Option<&str>,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore {
        uid: pg_sys::Oid,
        sec: i32,
        nest: i32,
        keep_gucs: bool,
        prev_acting: Option<pg_sys::Oid>,
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            unsafe {
                pg_sys::AtEOXact_GUC(self.keep_gucs, self.nest);
                pg_sys::SetUserIdAndSecContext(self.uid, self.sec);
            }
            ACTING_ROLE.with(|a| a.set(self.prev_acting));
        }
    }
    let mut uid = pg_sys::Oid::INVALID;
    let mut sec = 0i32;
    unsafe { pg_sys::GetUserIdAndSecContext(&mut uid, &mut sec) };
    let prev_acting = ACTING_ROLE.with(|a| a.replace(Some(a.get().unwrap_or(uid))));
    unsafe { pg_sys::SetUserIdAndSecContext(owner, sec | flags) };
    let nest = unsafe { pg_sys::NewGUCNestLevel() };
    let _restore = Restore {
        uid,
        sec,
        nest,
        keep_gucs,
        prev_acting,
    };
    match path {
        None => set_safe_search_path(),
        Some(p) => set_search_path(p),
    }
    f()
}

/// `search_path = pg_catalog, pg_temp` in the current GUC nest level.
fn set_safe_search_path() {
    set_search_path("pg_catalog, pg_temp")
}

/// `search_path = path` in the current GUC nest level (an invalid value
/// raises PostgreSQL's own error).
fn set_search_path(path: &str) {
    crate::pg::gucs::set_in_nest_level(c"search_path", path)
}

/// Runs `f` with `search_path = pg_catalog, pg_temp` (nothing else
/// changes): for the statements ekm runs as its caller, so that nothing
/// planted in the caller's search_path is picked up by them.
pub fn with_safe_search_path<R>(f: impl FnOnce() -> R) -> R {
    crate::pg::gucs::in_nest_level(|| {
        set_safe_search_path();
        f()
    })
}

/// An application table ekm was asked to work on.
#[derive(Clone, Debug)]
pub struct Table {
    pub owner: pg_sys::Oid,
    /// `pg_class.relkind`
    pub kind: char,
    /// schema-qualified and quoted, for SQL text
    pub qualified: String,
}

/// What `relkind` is, for messages.
fn kind_name(kind: char) -> &'static str {
    match kind {
        'r' => "a table",
        'p' => "a partitioned table",
        'v' => "a view",
        'm' => "a materialized view",
        'f' => "a foreign table",
        'S' => "a sequence",
        'i' | 'I' => "an index",
        'c' => "a composite type",
        't' => "a TOAST table",
        _ => "a relation",
    }
}

impl Table {
    /// The relation `oid`, if it exists (from the system caches: no query,
    /// cheap enough for every batch, and current after a rename or an
    /// ownership change).
    pub fn lookup(oid: pg_sys::Oid) -> Option<Table> {
        unsafe {
            let tup = pg_sys::SearchSysCache1(
                pg_sys::SysCacheIdentifier::RELOID as i32,
                pg_sys::Datum::from(oid),
            );
            if tup.is_null() {
                return None;
            }
            let form = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_class>(tup);
            let owner = (*form).relowner;
            let kind = (*form).relkind as u8 as char;
            let nsp = pg_sys::get_namespace_name((*form).relnamespace);
            let q = (!nsp.is_null())
                .then(|| pg_sys::quote_qualified_identifier(nsp, (*form).relname.data.as_ptr()));
            pg_sys::ReleaseSysCache(tup);
            let qualified = std::ffi::CStr::from_ptr(q?).to_string_lossy().into_owned();
            Some(Table {
                owner,
                kind,
                qualified,
            })
        }
    }

    /// Whether ekm may work on it: an ordinary or a partitioned table.
    pub fn is_table(&self) -> bool {
        matches!(self.kind, 'r' | 'p')
    }

    /// What it is, with its article ("a view", "an index").
    pub fn kind_name(&self) -> &'static str {
        kind_name(self.kind)
    }

    /// `oid` as a table ekm may work on, or the error to raise: 42P01 if
    /// it does not exist, 42809 for a view, materialized view, foreign
    /// table or anything else that is not an ordinary or partitioned table.
    pub fn require(oid: pg_sys::Oid) -> Result<Table> {
        let t = Table::lookup(oid).ok_or(EkmError::NoSuchTable(oid.to_u32()))?;
        if !t.is_table() {
            return Err(EkmError::NotATable {
                name: display_name(oid),
                kind: t.kind_name(),
            });
        }
        Ok(t)
    }

    /// Runs `f` as the table's owner (see [`as_table_owner`]).
    pub fn as_owner<R>(&self, f: impl FnOnce() -> R) -> R {
        as_table_owner(self.owner, f)
    }
}

/// A relation's name as the caller would write it (schema-qualified only
/// when not visible in the caller's search_path), like `regclass` output.
pub fn display_name(oid: pg_sys::Oid) -> String {
    unsafe {
        let rel = pg_sys::get_rel_name(oid);
        if rel.is_null() {
            return oid.to_u32().to_string();
        }
        let q = if pg_sys::RelationIsVisible(oid) {
            pg_sys::quote_identifier(rel)
        } else {
            let nsp = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(oid));
            if nsp.is_null() {
                pg_sys::quote_identifier(rel)
            } else {
                pg_sys::quote_qualified_identifier(nsp, rel)
            }
        };
        std::ffi::CStr::from_ptr(q).to_string_lossy().into_owned()
    }
}

/// An identifier quoted for SQL text, as PostgreSQL's `quote_ident` does.
pub fn quote_ident(name: &str) -> String {
    let c = std::ffi::CString::new(name).unwrap_or_default();
    unsafe { std::ffi::CStr::from_ptr(pg_sys::quote_identifier(c.as_ptr())) }
        .to_string_lossy()
        .into_owned()
}

/// A literal quoted for SQL text, as PostgreSQL's `quote_literal` does.
pub fn quote_literal(s: &str) -> String {
    let c = std::ffi::CString::new(s).unwrap_or_default();
    unsafe { std::ffi::CStr::from_ptr(pg_sys::quote_literal_cstr(c.as_ptr())) }
        .to_string_lossy()
        .into_owned()
}

/// Whether the role that called ekm may SELECT column `col` of `tbl`.
pub fn caller_may_read(tbl: pg_sys::Oid, col: &str) -> Result<bool> {
    let role = ACTING_ROLE
        .with(|a| a.get())
        .unwrap_or_else(|| unsafe { pg_sys::GetUserId() });
    Ok(one::<bool>(
        "SELECT pg_catalog.has_column_privilege($1, $2, $3, 'SELECT')",
        vec![role.into(), tbl.into(), col.into()],
    )?
    .unwrap_or(false))
}

/// The role that called ekm (not the owner ekm acts as).
pub fn acting_role_name() -> String {
    let oid = ACTING_ROLE
        .with(|a| a.get())
        .unwrap_or_else(|| unsafe { pg_sys::GetUserId() });
    unsafe { std::ffi::CStr::from_ptr(pg_sys::GetUserNameFromId(oid, true)) }
        .to_string_lossy()
        .into_owned()
}
