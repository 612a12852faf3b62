//! Key custody: ekm's own tables, the master key, the per-backend cache of
//! unwrapped data keys, the shared-memory encryption counters, ekm's locks
//! and the key lifecycle operations. Uses `pg`; never `jobs` or `sql`.

pub mod catalog;
pub mod cluster;
pub mod keycache;
pub mod lifecycle;
pub mod locks;
pub mod masterkey;
pub mod shmem;
