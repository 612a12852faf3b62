//! Jobs: rotation, rollback, column encryption and database scans, run by
//! background workers as the protocol steps of docs/design.md (section 5).
//! Uses `keys` and `pg`; never `sql`.

pub mod batchfn;
pub mod cluster;
pub mod helpers;
pub mod node;
pub mod notify;
pub mod pace;
pub mod protocol;
pub mod scan;
pub mod start;
pub mod worker;
