//! The states of a key (created, active, rotating, retired, destroyed), what
//! each may do, and which may follow which. The rules that raise errors
//! (checked transitions, parsing) are in `lifecycle`; this module uses
//! nothing else of the crate, so `error` can name a state.

use std::fmt;

#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum KeyState {
    /// Made, never used: neither encrypts nor decrypts.
    Created,
    /// The one key that encrypts; also decrypts.
    Active,
    /// Superseded; decrypts while its data moves to the active key.
    Rotating,
    /// Neither; its material is kept for rollback and old backups.
    Retired,
    /// Material erased; the row is kept for audit.
    Destroyed,
}

impl KeyState {
    pub const ALL: [KeyState; 5] = [
        KeyState::Created,
        KeyState::Active,
        KeyState::Rotating,
        KeyState::Retired,
        KeyState::Destroyed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Created => "created",
            KeyState::Active => "active",
            KeyState::Rotating => "rotating",
            KeyState::Retired => "retired",
            KeyState::Destroyed => "destroyed",
        }
    }

    pub fn can_encrypt(self) -> bool {
        self == KeyState::Active
    }

    pub fn can_decrypt(self) -> bool {
        matches!(self, KeyState::Active | KeyState::Rotating)
    }

    /// Whether the state may change from `self` to `to`. Staying put is allowed.
    pub fn may_become(self, to: KeyState) -> bool {
        use KeyState::*;
        self == to
            || matches!(
                (self, to),
                (Created, Active)
                    | (Created, Destroyed)
                    | (Active, Rotating)
                    | (Rotating, Active)
                    | (Rotating, Retired)
                    | (Retired, Active)
                    | (Retired, Rotating)
                    | (Retired, Destroyed)
            )
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
