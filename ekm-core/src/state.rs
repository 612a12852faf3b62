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

impl KeyState {
    /// The states a key passes through from `self` to `to`, each step one
    /// [`KeyState::may_become`] allows (`to` last; empty when they are the
    /// same), the shortest such path; `None` when there is none (nothing
    /// comes back from destroyed). A node that missed a key's changes (a
    /// Citus worker node synced later) catches up along it.
    pub fn path_to(self, to: KeyState) -> Option<Vec<KeyState>> {
        let mut paths: Vec<Vec<KeyState>> = vec![vec![self]];
        for _ in 0..KeyState::ALL.len() {
            if let Some(p) = paths.iter().find(|p| *p.last().expect("never empty") == to) {
                return Some(p[1..].to_vec());
            }
            let mut next = Vec::new();
            for p in &paths {
                let last = *p.last().expect("never empty");
                for s in KeyState::ALL {
                    if s != last && last.may_become(s) && !p.contains(&s) {
                        let mut q = p.clone();
                        q.push(s);
                        next.push(q);
                    }
                }
            }
            paths = next;
        }
        None
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_to_steps_through_allowed_states() {
        use KeyState::*;
        assert_eq!(Active.path_to(Active), Some(vec![]));
        assert_eq!(Active.path_to(Rotating), Some(vec![Rotating]));
        assert_eq!(Active.path_to(Retired), Some(vec![Rotating, Retired]));
        assert_eq!(
            Active.path_to(Destroyed),
            Some(vec![Rotating, Retired, Destroyed])
        );
        assert_eq!(
            Created.path_to(Retired),
            Some(vec![Active, Rotating, Retired])
        );
        assert_eq!(Retired.path_to(Active), Some(vec![Active]));
        assert_eq!(Destroyed.path_to(Active), None);
        assert_eq!(Created.path_to(Destroyed), Some(vec![Destroyed]));
        for from in KeyState::ALL {
            for to in KeyState::ALL {
                if let Some(p) = from.path_to(to) {
                    let mut at = from;
                    for s in &p {
                        assert!(at.may_become(*s), "{from} -> {to}: {at} -> {s}");
                        at = *s;
                    }
                    assert_eq!(at, to);
                }
            }
        }
    }
}
