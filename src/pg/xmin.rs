//! A session that only waits need not hold back the xmin horizon.
//!
//! `SELECT ekm_rotation_wait(...)` runs for as long as the job does, and the
//! statement's snapshot, registered by its portal, keeps this backend's
//! `xmin` at the statement's start: every vacuum in the database, the one
//! behind the rotation's own batches included, then keeps every row version
//! the rotation rewrote, and the table doubles. A statement that reads no
//! table (its plan has no relation in its range table), in a transaction of
//! its own (no cursor or earlier statement holds a snapshot) and at READ
//! COMMITTED (every poll takes a new snapshot), never reads through that
//! snapshot again: between polls it may advertise no xmin, and the next
//! snapshot it takes sets a current one (`GetSnapshotData`).

use pgrx::pg_sys;

/// Whether the running statement may drop its xmin between polls (see the
/// module's documentation).
pub fn waiting_statement_may_release_xmin() -> bool {
    unsafe {
        if pg_sys::IsTransactionBlock()
            || pg_sys::XactIsoLevel >= pg_sys::XACT_REPEATABLE_READ as i32
        {
            return false;
        }
        let portal = pg_sys::ActivePortal;
        if portal.is_null() || (*portal).stmts.is_null() {
            return false;
        }
        let stmts = pgrx::PgList::<pg_sys::Node>::from_pg((*portal).stmts);
        for s in stmts.iter_ptr() {
            if s.is_null() || (*s).type_ != pg_sys::NodeTag::T_PlannedStmt {
                return false;
            }
            let p = s as *mut pg_sys::PlannedStmt;
            if (*p).commandType != pg_sys::CmdType::CMD_SELECT {
                return false;
            }
            let rtable = pgrx::PgList::<pg_sys::RangeTblEntry>::from_pg((*p).rtable);
            for rte in rtable.iter_ptr() {
                if rte.is_null() || (*rte).rtekind != pg_sys::RTEKind::RTE_FUNCTION {
                    return false;
                }
            }
        }
        true
    }
}

/// Advertises no xmin until this backend's next snapshot. Only for a
/// statement [`waiting_statement_may_release_xmin`] allowed.
pub fn release_xmin() {
    unsafe {
        // the catalog snapshot too is taken anew when next needed
        pg_sys::InvalidateCatalogSnapshot();
        if !pg_sys::MyProc.is_null() {
            (*pg_sys::MyProc).xmin = pg_sys::InvalidTransactionId;
        }
    }
}
