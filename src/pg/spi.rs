//! SPI helpers: one value or row from a query with bound parameters, a
//! statement's row count, plans kept for the life of the backend, and
//! `SET LOCAL`. The support layer under everything else; it knows nothing of
//! ekm's tables.

use ekm_core::{EkmError, Result};
use pgrx::prelude::*;
use pgrx::PgOid;

/// An SPI error as ekm's internal error.
pub fn err(e: pgrx::spi::Error) -> EkmError {
    EkmError::Internal(format!("catalog access failed: {e}"))
}

/// Runs a statement with bound parameters (as whoever we are now).
pub fn exec(sql: &str, args: Vec<pgrx::datum::DatumWithOid<'_>>) -> Result<u64> {
    Spi::connect_mut(|c| c.update(sql, None, &args).map(|t| t.len() as u64)).map_err(err)
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
    Spi::connect_mut(|c| first_value(c.update(sql, Some(1), &args)?)).map_err(err)
}

/// One value from a read-only query with bound parameters.
pub fn one<T: FromDatum + IntoDatum>(
    sql: &str,
    args: Vec<pgrx::datum::DatumWithOid<'_>>,
) -> Result<Option<T>> {
    Spi::connect(|c| first_value(c.select(sql, Some(1), &args)?)).map_err(err)
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
    .map_err(err)
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
    .map_err(err)
}

/// An SPI error as text (the worker's steps report errors as text).
pub fn err_text(e: pgrx::spi::Error) -> String {
    e.to_string()
}

pub fn one_i64(
    sql: &str,
    args: Vec<pgrx::datum::DatumWithOid<'_>>,
) -> std::result::Result<i64, String> {
    Spi::connect_mut(|c| {
        let t = c.update(sql, Some(1), &args)?;
        if t.is_empty() {
            Ok(0)
        } else {
            Ok(t.first().get::<i64>(1)?.unwrap_or(0))
        }
    })
    .map_err(err_text)
}

thread_local! {
    /// Statements every batch runs, prepared once per worker (SPI_keepplan).
    static KEPT: std::cell::RefCell<std::collections::HashMap<&'static str, pgrx::spi::OwnedPreparedStatement>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

pub const INT8: pg_sys::Oid = pg_sys::INT8OID;

/// Runs `sql` (prepared on first use, then reused) with `args` of `types`;
/// `f` reads the result.
pub fn kept<R>(
    sql: &'static str,
    types: &[pg_sys::Oid],
    mutating: bool,
    args: &[pgrx::datum::DatumWithOid<'_>],
    f: impl FnOnce(pgrx::spi::SpiTupleTable<'_>) -> pgrx::spi::SpiResult<R>,
) -> std::result::Result<R, String> {
    KEPT.with(|k| {
        let mut k = k.borrow_mut();
        Spi::connect_mut(|c| -> pgrx::spi::SpiResult<R> {
            if !k.contains_key(sql) {
                let types: Vec<PgOid> = types.iter().map(|&t| PgOid::from(t)).collect();
                let p = if mutating {
                    c.prepare_mut(sql, &types)?
                } else {
                    c.prepare(sql, &types)?
                };
                k.insert(sql, p.keep());
            }
            let stmt = k.get(sql).expect("prepared above");
            let t = if mutating {
                c.update(stmt, None, args)?
            } else {
                c.select(stmt, None, args)?
            };
            f(t)
        })
    })
    .map_err(err_text)
}

/// `SET LOCAL name = value`, without a statement.
/// The worker runs as the bootstrap superuser, so superuser-only settings
/// (deadlock_timeout) may be set too.
pub fn set_local(name: &str, value: &str) {
    let name = std::ffi::CString::new(name).expect("no NUL in a setting name");
    let value = std::ffi::CString::new(value).expect("no NUL in a setting value");
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_LOCAL,
            true,
            pg_sys::PGERROR as i32,
            false,
        );
    }
}
