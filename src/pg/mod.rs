//! The PostgreSQL support layer: SPI helpers, acting as a table's or ekm's
//! owner, errors and the log hook, settings, log redaction, timestamps and
//! `text` varlenas. It uses nothing else of ekm (only `ekm-core`).

pub mod citus;
pub mod error;
pub mod gucs;
pub mod owner;
pub mod redact;
pub mod spi;
pub mod time;
pub mod vacuum;
pub mod varlena;
pub mod xact;
pub mod xmin;
