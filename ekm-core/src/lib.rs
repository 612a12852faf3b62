//! ekm's security-critical core, free of PostgreSQL: the ciphertext format,
//! envelope encryption, key ids, the key lifecycle and rotation policy.

pub mod alloc;
pub mod crypto;
pub mod error;
pub mod fernet;
pub mod format;
pub mod gcm;
pub mod keyid;
pub mod lifecycle;
pub mod pace;
pub mod redact;
pub mod state;

pub use crypto::{DataKey, MasterKey};
pub use error::{EkmError, Result};
pub use keyid::KeyId;
pub use lifecycle::{KeyState, Policy};
