//! Access to ekm's tables. Application roles cannot read `ekm.key_material`,
//! so every access runs as the tables' owner with a fixed search_path, the
//! way a SECURITY DEFINER function would; the caller's EXECUTE privilege on
//! the ekm function is the gate. All values go in as bound parameters.

use ekm_core::{EkmError, KeyId, KeyState, Result};
use pgrx::prelude::*;
use pgrx::spi::SpiResult;
use std::cell::Cell;

thread_local! {
    /// The role that called into ekm while we act as the owner, for the audit log.
    static ACTING_ROLE: Cell<Option<pg_sys::Oid>> = const { Cell::new(None) };
}

fn spi_err(e: pgrx::spi::Error) -> EkmError {
    EkmError::Internal(format!("catalog access failed: {e}"))
}

/// `(oid of ekm.key, owner of ekm.key)`, read from the system catalogs,
/// which every role may read.
pub fn key_table() -> Result<(pg_sys::Oid, pg_sys::Oid)> {
    let r = Spi::connect(|c| -> SpiResult<Option<(pg_sys::Oid, pg_sys::Oid)>> {
        let t = c.select(
            "SELECT c.oid, c.relowner FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname OPERATOR(pg_catalog.=) 'ekm' AND c.relname OPERATOR(pg_catalog.=) 'key'",
            Some(1),
            &[],
        )?;
        if t.is_empty() {
            return Ok(None);
        }
        let t = t.first();
        Ok(Some((t.get::<pg_sys::Oid>(1)?.unwrap_or_default(), t.get::<pg_sys::Oid>(2)?.unwrap_or_default())))
    })
    .map_err(spi_err)?;
    r.ok_or_else(|| {
        EkmError::Internal(
            "ekm's tables are missing: is the extension created in this database?".into(),
        )
    })
}

/// Runs `f` as `owner` with `search_path = pg_catalog, pg_temp`, restoring
/// the caller's identity and settings afterwards (also on error).
pub fn as_owner<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    struct Restore {
        uid: pg_sys::Oid,
        sec: i32,
        nest: i32,
        prev_acting: Option<pg_sys::Oid>,
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            unsafe {
                pg_sys::AtEOXact_GUC(true, self.nest);
                pg_sys::SetUserIdAndSecContext(self.uid, self.sec);
            }
            ACTING_ROLE.with(|a| a.set(self.prev_acting));
        }
    }
    let mut uid = pg_sys::Oid::INVALID;
    let mut sec = 0i32;
    unsafe { pg_sys::GetUserIdAndSecContext(&mut uid, &mut sec) };
    let prev_acting = ACTING_ROLE.with(|a| a.replace(Some(a.get().unwrap_or(uid))));
    let nest = unsafe { pg_sys::NewGUCNestLevel() };
    let _restore = Restore {
        uid,
        sec,
        nest,
        prev_acting,
    };
    unsafe {
        pg_sys::SetUserIdAndSecContext(owner, sec | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
    }
    f()
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

pub struct KeyRow {
    pub id: KeyId,
    pub state: KeyState,
    pub wrapped: Option<Vec<u8>>,
    pub kcv: Vec<u8>,
}

/// Every key with its material (as owner).
pub fn load_keys(owner: pg_sys::Oid) -> Result<Vec<KeyRow>> {
    as_owner(owner, || {
        Spi::connect(|c| -> SpiResult<Vec<(String, String, Option<Vec<u8>>, Option<Vec<u8>>)>> {
            let t = c.select(
                "SELECT k.key_id, k.rotation_status, m.wrapped, m.master_kcv \
                 FROM ekm.key k LEFT JOIN ekm.key_material m ON m.key_id = k.key_id ORDER BY k.key_id",
                None,
                &[],
            )?;
            let mut v = Vec::new();
            for row in t {
                v.push((
                    row.get::<String>(1)?.unwrap_or_default(),
                    row.get::<String>(2)?.unwrap_or_default(),
                    row.get::<Vec<u8>>(3)?,
                    row.get::<Vec<u8>>(4)?,
                ));
            }
            Ok(v)
        })
        .map_err(spi_err)
    })?
    .into_iter()
    .map(|(id, state, wrapped, kcv)| {
        Ok(KeyRow { id: KeyId::parse(&id)?, state: state.parse()?, wrapped, kcv: kcv.unwrap_or_default() })
    })
    .collect()
}

/// Appends an audit event (as owner). `detail` is a JSON object.
pub fn audit(event: &str, key_id: Option<&str>, detail: &str) -> Result<()> {
    let role = acting_role_name();
    Spi::connect_mut(|c| {
        c.update(
            "INSERT INTO ekm.audit_log (acting_role, event, key_id, detail) VALUES ($1, $2, $3, $4::jsonb)",
            None,
            &[role.into(), event.into(), key_id.into(), detail.into()],
        )
        .map(|_| ())
    })
    .map_err(spi_err)
}

/// Runs a statement with bound parameters (as whoever we are now).
pub fn exec(sql: &str, args: Vec<pgrx::datum::DatumWithOid<'_>>) -> Result<u64> {
    Spi::connect_mut(|c| c.update(sql, None, &args).map(|t| t.len() as u64)).map_err(spi_err)
}

/// The first column of the first row of `t`; `None` when there is no row (or NULL).
fn first_value<T: FromDatum + IntoDatum>(
    t: pgrx::spi::SpiTupleTable<'_>,
) -> pgrx::spi::SpiResult<Option<T>> {
    if t.is_empty() {
        Ok(None)
    } else {
        t.first().get::<T>(1)
    }
}

/// One value from a statement with bound parameters that may write.
pub fn one_mut<T: FromDatum + IntoDatum>(
    sql: &str,
    args: Vec<pgrx::datum::DatumWithOid<'_>>,
) -> Result<Option<T>> {
    Spi::connect_mut(|c| first_value(c.update(sql, Some(1), &args)?)).map_err(spi_err)
}

/// One value from a read-only query with bound parameters.
pub fn one<T: FromDatum + IntoDatum>(
    sql: &str,
    args: Vec<pgrx::datum::DatumWithOid<'_>>,
) -> Result<Option<T>> {
    Spi::connect(|c| first_value(c.select(sql, Some(1), &args)?)).map_err(spi_err)
}

/// A flat JSON object of string values (escaped), for audit details.
pub fn json_object(fields: &[(&str, &str)]) -> String {
    let esc = |s: &str| {
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    };
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("\"{}\": \"{}\"", esc(k), esc(v)))
        .collect();
    format!("{{{}}}", body.join(", "))
}

/// The first row's first two columns from a read-only query (`None`s when
/// there is no row). Read-only: it works on a hot standby and assigns no xid.
pub fn two<A: FromDatum + IntoDatum, B: FromDatum + IntoDatum>(
    sql: &str,
    args: Vec<pgrx::datum::DatumWithOid<'_>>,
) -> Result<(Option<A>, Option<B>)> {
    Spi::connect(|c| {
        let t = c.select(sql, Some(1), &args)?;
        if t.is_empty() {
            Ok((None, None))
        } else {
            let r = t.first();
            Ok((r.get::<A>(1)?, r.get::<B>(2)?))
        }
    })
    .map_err(spi_err)
}

/// Like [`two`], three columns.
pub fn three<A: FromDatum + IntoDatum, B: FromDatum + IntoDatum, C: FromDatum + IntoDatum>(
    sql: &str,
    args: Vec<pgrx::datum::DatumWithOid<'_>>,
) -> Result<(Option<A>, Option<B>, Option<C>)> {
    Spi::connect(|c| {
        let t = c.select(sql, Some(1), &args)?;
        if t.is_empty() {
            Ok((None, None, None))
        } else {
            let r = t.first();
            Ok((r.get::<A>(1)?, r.get::<B>(2)?, r.get::<C>(3)?))
        }
    })
    .map_err(spi_err)
}
