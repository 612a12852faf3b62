//! Fallible allocation for sizes that come from input: a failed Rust
//! allocation aborts the process, and in a PostgreSQL backend that sends the
//! whole server into crash recovery, so these return `OutOfMemory` (53200).

use crate::error::{EkmError, Result};

/// `n` zeroed bytes on the heap, or `OutOfMemory`: sizes that come from
/// input (a value, a context) are never allocated infallibly, because a
/// failed Rust allocation aborts the process, and in a PostgreSQL backend
/// that takes the whole server into crash recovery.
pub fn try_zeroed(n: usize) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| EkmError::OutOfMemory(n))?;
    v.resize(n, 0);
    Ok(v)
}

/// A copy of `s`, or `OutOfMemory` (see [`try_zeroed`]).
pub fn try_copy_str(s: &str) -> Result<String> {
    let mut out = String::new();
    out.try_reserve_exact(s.len())
        .map_err(|_| EkmError::OutOfMemory(s.len()))?;
    out.push_str(s);
    Ok(out)
}
