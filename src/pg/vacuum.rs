//! `VACUUM` of one table from a background worker, outside any transaction:
//! what a rotation runs behind its batches so that the space their old row
//! versions held is reused (docs/design.md, section 5, "Pace").
//!
//! `VACUUM` cannot run through SPI (it refuses a function's context), so the
//! statement is parsed and handed to `ExecVacuum` as PostgreSQL's own
//! top-level statement path does. `vacuum()` commits the transaction it is
//! called in and runs each table in transactions of its own; it allocates
//! under `PortalContext`, which a background worker does not have: it gets
//! a context of its own for the call. `vacuum_rel` itself runs the table's
//! code (index expressions) as the table's owner, security-restricted.

use pgrx::pg_sys;
use pgrx::PgTryBuilder;
use std::ffi::CString;

/// `VACUUM (SKIP_LOCKED, TRUNCATE false, PARALLEL 0)` of the table `rel`;
/// false if it no longer exists. Must be called between transactions.
/// `index_cleanup`: `INDEX_CLEANUP on` (the default, `auto`, may leave the
/// index entries of a small share of dead rows for later, which an index on
/// a column whose every value changes cannot afford). SKIP_LOCKED: a table someone holds a
/// conflicting lock on is skipped, never waited for; TRUNCATE false: no
/// `ACCESS EXCLUSIVE` lock that would stall the application's reads for
/// the freed tail; PARALLEL 0: no parallel workers of its own.
pub fn vacuum_table(rel: pg_sys::Oid, index_cleanup: bool) -> Result<bool, String> {
    unsafe {
        let ctx = pg_sys::AllocSetContextCreateExtended(
            pg_sys::TopMemoryContext,
            c"ekm vacuum".as_ptr(),
            pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        );
        let saved_portal = pg_sys::PortalContext;
        let saved_ctx = pg_sys::CurrentMemoryContext;
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        let r = PgTryBuilder::new(|| {
            // its name now (the statement names it; vacuum() takes it by OID)
            let Some(table) = crate::pg::owner::Table::lookup(rel).filter(|t| t.kind == 'r') else {
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
                return Ok(false);
            };
            let sql = CString::new(format!(
                "VACUUM (SKIP_LOCKED, TRUNCATE false, PARALLEL 0, INDEX_CLEANUP {}) {}",
                if index_cleanup { "on" } else { "auto" },
                table.qualified
            ))
            .map_err(|_| "a table name with a NUL byte".to_string())?;
            // the statement outlives the transaction vacuum() commits
            pg_sys::MemoryContextSwitchTo(ctx);
            pg_sys::PortalContext = ctx;
            let list = pg_sys::raw_parser(sql.as_ptr(), pg_sys::RawParseMode::RAW_PARSE_DEFAULT);
            let raw = pgrx::PgList::<pg_sys::RawStmt>::from_pg(list)
                .get_ptr(0)
                .expect("one statement");
            let stmt = (*raw).stmt as *mut pg_sys::VacuumStmt;
            let vrel = pgrx::PgList::<pg_sys::VacuumRelation>::from_pg((*stmt).rels)
                .get_ptr(0)
                .expect("one table");
            // by OID: a table renamed meanwhile is still this one
            (*vrel).oid = rel;
            let pstate = pg_sys::make_parsestate(std::ptr::null_mut());
            pg_sys::ExecVacuum(pstate, stmt, true);
            pg_sys::CommitTransactionCommand();
            Ok(true)
        })
        .catch_others(|e| match e {
            pg_sys::panic::CaughtError::PostgresError(r)
            | pg_sys::panic::CaughtError::ErrorReport(r) => Err(r.message().to_string()),
            pg_sys::panic::CaughtError::RustPanic { ereport, .. } => {
                Err(ereport.message().to_string())
            }
        })
        .execute();
        if r.is_err() {
            pg_sys::AbortCurrentTransaction();
        }
        pg_sys::PortalContext = saved_portal;
        pg_sys::MemoryContextSwitchTo(saved_ctx);
        pg_sys::MemoryContextDelete(ctx);
        r
    }
}
