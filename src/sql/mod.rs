//! The SQL surface: every `#[pg_extern]` function and the per-row V1
//! functions. Thin: argument checks, refusals with their SQLSTATE and hint,
//! and result rows; the work is in `jobs`, `keys` and `pg`.

pub mod cleanup;
pub mod cluster;
pub mod fastpath;
pub mod fernet;
pub mod health;
pub mod keys;
pub mod ops;
pub mod rotation;
