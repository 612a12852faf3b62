//! Every failure ekm reports, with the SQLSTATE and hint the extension raises.
//! Messages never carry plaintext or key bytes: only key ids, states and
//! lengths, which are not secret.

use crate::state::KeyState;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EkmError {
    #[error("value is not an ekm ciphertext")]
    NotCiphertext,
    #[error("ekm ciphertext format version \"{0}\" is not supported by this ekm")]
    UnsupportedVersion(String),
    #[error("ekm ciphertext is truncated or malformed ({0})")]
    Malformed(&'static str),
    #[error("ekm ciphertext could not be authenticated with key {0}: the context does not match, or the value was altered")]
    AuthenticationFailed(String),
    #[error("key {0} does not exist in this database")]
    UnknownKey(String),
    #[error("key {key_id} is {state} and cannot {action}")]
    KeyNotUsable {
        key_id: String,
        state: KeyState,
        action: &'static str,
    },
    #[error("invalid key id \"{0}\"")]
    InvalidKeyId(String),
    #[error("no active ekm key")]
    NoActiveKey,
    #[error("key {key_id} cannot go from {from} to {to}")]
    InvalidTransition {
        key_id: String,
        from: KeyState,
        to: KeyState,
    },
    #[error("ekm master key is not available: {0}")]
    MasterKeyUnavailable(String),
    #[error("ekm master key from {0} is not a 256-bit key")]
    MasterKeyInvalid(String),
    #[error(
        "ekm master key does not match the one key {key_id} was wrapped with (key check value mismatch): the key expects master key fingerprint {expected}, the configured master key has fingerprint {configured}"
    )]
    MasterKeyMismatch {
        key_id: String,
        expected: String,
        configured: String,
    },
    #[error("a master key rotation is under way: keys are wrapped under master key fingerprint {previous}, not the configured {configured}")]
    MasterKeyRotationPending {
        previous: String,
        configured: String,
    },
    #[error("wrapped material of key {0} failed authentication")]
    WrappedKeyCorrupt(String),
    #[error("value of {0} bytes is too long to encrypt (AES-GCM allows at most {max} bytes per value)", max = crate::gcm::MAX_PLAINTEXT)]
    TooLong(usize),
    #[error("out of memory: ekm could not allocate {0} bytes")]
    OutOfMemory(usize),
    #[error("relation with OID {0} does not exist")]
    NoSuchTable(u32),
    #[error("\"{name}\" is {kind}, not a table")]
    NotATable { name: String, kind: &'static str },
    #[error("{member} is {kind} ({how} {table}): ekm rotates only values stored in this database's own tables")]
    NotStoredHere {
        member: String,
        kind: &'static str,
        how: &'static str,
        table: String,
    },
    #[error("ekm's objects in this database are version {installed}, but the loaded ekm library is version {library}")]
    ObjectsOutdated {
        installed: String,
        library: &'static str,
    },
    #[error("Fernet token is malformed: {0}")]
    FernetMalformed(&'static str),
    #[error("Fernet token could not be authenticated with {0}: the value was altered, or it was made with another key")]
    FernetAuthenticationFailed(String),
    #[error("Fernet key {0} is not imported in this database")]
    FernetKeyNotImported(String),
    #[error("no Fernet key is imported in this database, so Fernet values cannot be decrypted")]
    NoFernetKeys,
    #[error("the Fernet key is not valid: {0}")]
    FernetKeyInvalid(&'static str),
    #[error("ekm internal error: {0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, EkmError>;

impl EkmError {
    /// The SQLSTATE the extension raises for this error.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            EkmError::NotCiphertext => "22P02", // invalid_text_representation
            EkmError::UnsupportedVersion(_) => "0A000", // feature_not_supported
            EkmError::Malformed(_) => "22P03",  // invalid_binary_representation
            EkmError::AuthenticationFailed(_) => "XX001", // data_corrupted
            EkmError::UnknownKey(_) => "42704", // undefined_object
            EkmError::KeyNotUsable { .. } => "55000", // object_not_in_prerequisite_state
            EkmError::InvalidKeyId(_) => "22023", // invalid_parameter_value
            EkmError::NoActiveKey => "55000",
            EkmError::InvalidTransition { .. } => "55000",
            EkmError::MasterKeyUnavailable(_) => "58000", // system_error
            EkmError::MasterKeyInvalid(_) => "F0000",     // config_file_error
            EkmError::MasterKeyMismatch { .. } => "28000",
            EkmError::MasterKeyRotationPending { .. } => "55000", // invalid_authorization_specification
            EkmError::WrappedKeyCorrupt(_) => "XX001",
            EkmError::TooLong(_) => "54000", // program_limit_exceeded
            EkmError::OutOfMemory(_) => "53200", // out_of_memory
            EkmError::NoSuchTable(_) => "42P01", // undefined_table
            EkmError::NotATable { .. } | EkmError::NotStoredHere { .. } => "42809", // wrong_object_type
            EkmError::ObjectsOutdated { .. } => "55000",
            EkmError::FernetMalformed(_) => "22P03",
            EkmError::FernetAuthenticationFailed(_) => "XX001",
            EkmError::FernetKeyInvalid(_) => "22023",
            EkmError::FernetKeyNotImported(_) | EkmError::NoFernetKeys => "42704",
            EkmError::Internal(_) => "XX000",
        }
    }

    /// What the DBA can do about it.
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            EkmError::NotCiphertext => {
                "ekm ciphertexts start with \"ekm1:\"; use ekm_is_encrypted(value) to find values that are not encrypted".into()
            }
            EkmError::UnsupportedVersion(_) => "install the ekm version that wrote this value".into(),
            EkmError::Malformed(_) | EkmError::AuthenticationFailed(_) => {
                "decrypt with the context the value was encrypted with; otherwise restore the value from a backup".into()
            }
            EkmError::UnknownKey(_) => {
                "the key was never created in this database: restore ekm's key tables from the backup that holds it".into()
            }
            EkmError::KeyNotUsable { key_id, state, .. } => match state {
                KeyState::Retired => format!("reactivate it with SELECT ekm_activate_key('{key_id}')"),
                KeyState::Destroyed => "its material was erased; restore the value from a backup taken before the key was destroyed".into(),
                KeyState::Created => format!("activate it with SELECT ekm_activate_key('{key_id}')"),
                _ => return None,
            },
            EkmError::InvalidKeyId(_) => "key ids look like key_20250927_153045_b7c2; list them with SELECT key_id FROM ekm.keys".into(),
            EkmError::NoActiveKey => "activate a key with SELECT ekm_activate_key(key_id)".into(),
            EkmError::InvalidTransition { .. } => {
                "key states go created -> active -> rotating -> retired -> destroyed; an inactive key can be made active again".into()
            }
            EkmError::MasterKeyUnavailable(_) => {
                "check ekm.master_key_command or ekm.master_key_file in postgresql.conf and the server log, then SELECT pg_reload_conf()".into()
            }
            EkmError::MasterKeyInvalid(_) => {
                "the key must be 64 hexadecimal digits or 44 base64 characters (32 bytes), optionally followed by a newline".into()
            }
            EkmError::MasterKeyMismatch { .. } => {
                "configure the master key this database's keys were wrapped with (ekm.master_key_command / ekm.master_key_file; while a master key rotation is under way, ekm.previous_master_key_command / ekm.previous_master_key_file); nothing was changed".into()
            }
            EkmError::MasterKeyRotationPending { .. } => {
                "finish it first: SELECT * FROM ekm_rotate_master_key() re-wraps every key under the configured master key".into()
            }
            EkmError::WrappedKeyCorrupt(_) => "restore ekm.key_material from a backup".into(),
            EkmError::TooLong(_) => "store values this large outside the database, or split them".into(),
            EkmError::OutOfMemory(_) => "retry with fewer or smaller values at a time".into(),
            EkmError::NoSuchTable(_) => return None,
            EkmError::NotATable { .. } => "ekm works on columns of ordinary and partitioned tables: name the table that holds the values".into(),
            EkmError::NotStoredHere { member, how: "registered in", .. } => format!(
                "unregister it (SELECT ekm_unregister_column('{member}', <column>)) and encrypt its values where they are stored"
            ),
            EkmError::NotStoredHere { member, how: "a partition of", table, .. } => format!(
                "detach it (ALTER TABLE {table} DETACH PARTITION {member}) and encrypt its values where they are stored, \
                 or register the local partitions one by one; nothing was registered or retired"
            ),
            EkmError::NotStoredHere { member, table, .. } => format!(
                "detach it (ALTER TABLE {member} NO INHERIT {table}) and encrypt its values where they are stored, \
                 or register the other children one by one; nothing was registered or retired"
            ),
            EkmError::ObjectsOutdated { .. } => {
                "run ALTER EXTENSION ekm UPDATE in this database (encryption and decryption keep working until then)".into()
            }
            EkmError::FernetMalformed(_) | EkmError::FernetAuthenticationFailed(_) => {
                "Fernet values decrypt with the keys imported by ekm_import_fernet_key (SELECT key_id FROM ekm.keys WHERE kind = 'fernet'); import the key that made it, or restore the value from a backup".into()
            }
            EkmError::FernetKeyNotImported(id) => format!(
                "import it from the application's key store: SELECT ekm_import_fernet_key('{id}', '<its Fernet key>')"
            ),
            EkmError::NoFernetKeys => {
                "import the application's Fernet keys: SELECT ekm_import_fernet_keys('<JSON of the key store>') or ekm_import_fernet_key(key_id, key)".into()
            }
            EkmError::FernetKeyInvalid(_) => {
                "pass the key exactly as the application's key store holds it (Fernet.generate_key() output, 44 characters)".into()
            }
            EkmError::Internal(_) => return None,
        })
    }
}
