//! Transactions of a background worker: each call runs a closure in a
//! transaction of its own, commits it, or aborts it on ERROR and returns
//! the SQLSTATE and message. Counts the transaction ids they took.

use pgrx::prelude::*;
use pgrx::PgTryBuilder;

thread_local! {
    static OWN_XIDS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many of this backend's transactions run by [`transaction`] took a
/// transaction id (its own share of the ids handed out).
pub fn own_xids() -> u64 {
    OWN_XIDS.with(|c| c.get())
}

/// The SQLSTATE and message of an error caught in a transaction.
fn caught(e: pg_sys::panic::CaughtError) -> (String, String) {
    match e {
        pg_sys::panic::CaughtError::PostgresError(r)
        | pg_sys::panic::CaughtError::ErrorReport(r) => {
            (format!("{:?}", r.sql_error_code()), r.message().to_string())
        }
        pg_sys::panic::CaughtError::RustPanic { ereport, .. } => {
            ("XX000".into(), ereport.message().to_string())
        }
    }
}

/// One transaction: `f` commits, or on ERROR (in `f` or in the commit) the
/// transaction is aborted and the SQLSTATE and message returned.
pub fn transaction<R>(f: impl FnOnce() -> Result<R, String>) -> Result<R, (String, String)> {
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let f = std::panic::AssertUnwindSafe(f);
    let r = PgTryBuilder::new(move || f().map_err(|m| ("XX000".to_string(), m)))
        .catch_others(|e| Err(caught(e)))
        .execute();
    // the throttle tells the application's transactions from this worker's
    if unsafe { pg_sys::GetTopTransactionIdIfAny() } != pg_sys::InvalidTransactionId {
        OWN_XIDS.with(|c| c.set(c.get() + 1));
    }
    match r {
        Ok(v) => {
            // The commit itself may fail: deferred triggers fire in it, and
            // extensions' pre-commit work runs in it (Citus prepares its
            // remote transactions there, and a node may be unreachable).
            // Such an ERROR aborts the transaction and is returned like
            // one of `f`'s, not raised out of the worker.
            let c = PgTryBuilder::new(|| {
                unsafe {
                    pg_sys::PopActiveSnapshot();
                    pg_sys::CommitTransactionCommand();
                }
                Ok(())
            })
            .catch_others(|e| Err(caught(e)))
            .execute();
            match c {
                Ok(()) => Ok(v),
                Err(e) => {
                    unsafe { pg_sys::AbortCurrentTransaction() };
                    Err(e)
                }
            }
        }
        Err(e) => {
            unsafe { pg_sys::AbortCurrentTransaction() };
            Err(e)
        }
    }
}
