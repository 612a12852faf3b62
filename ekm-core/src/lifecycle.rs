//! Key lifecycle (created -> active -> rotating -> retired -> destroyed) and
//! the rotation policy (the runbook's 90-day lifetime, due at 76 days or when
//! fewer than 14 days remain, or when the random-nonce budget runs low).

use crate::error::{EkmError, Result};
pub use crate::state::KeyState;
use chrono::{DateTime, Duration, Utc};
use std::str::FromStr;

impl KeyState {
    pub fn check_transition(self, to: KeyState, key_id: &str) -> Result<()> {
        if self.may_become(to) {
            Ok(())
        } else {
            Err(EkmError::InvalidTransition {
                key_id: key_id.to_string(),
                from: self,
                to,
            })
        }
    }
}

impl FromStr for KeyState {
    type Err = EkmError;
    fn from_str(s: &str) -> Result<Self> {
        KeyState::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| EkmError::Internal(format!("unknown key state {s:?}")))
    }
}

/// NIST SP 800-38D: at most 2^32 encryptions with random 96-bit nonces per key.
pub const NONCE_BOUND: f64 = 4_294_967_296.0;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    pub lifetime_days: i32,
    pub due_age_days: i32,
    pub warning_days: i32,
    /// Encryptions after which a key is due (a fraction of [`NONCE_BOUND`]).
    pub due_encryptions: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            lifetime_days: 90,
            due_age_days: 76,
            warning_days: 14,
            due_encryptions: NONCE_BOUND / 2.0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KeyAge {
    pub age_days: i64,
    pub expires_at: DateTime<Utc>,
    pub expires_in_days: i64,
    /// When rotation becomes due by age: the earlier of `created + due_age`
    /// and `expires - warning`.
    pub due_at: DateTime<Utc>,
    pub needs_rotation: bool,
}

impl Policy {
    pub fn evaluate(
        &self,
        created_at: DateTime<Utc>,
        now: DateTime<Utc>,
        encryptions: i64,
    ) -> KeyAge {
        let expires_at = created_at + Duration::days(self.lifetime_days as i64);
        let due_at = (created_at + Duration::days(self.due_age_days as i64))
            .min(expires_at - Duration::days(self.warning_days as i64));
        KeyAge {
            age_days: (now - created_at).num_days(),
            expires_at,
            expires_in_days: (expires_at - now).num_days(),
            due_at,
            needs_rotation: now >= due_at || encryptions as f64 >= self.due_encryptions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn transitions() {
        use KeyState::*;
        assert!(Created.may_become(Active));
        assert!(Active.may_become(Rotating));
        assert!(Rotating.may_become(Retired));
        assert!(Retired.may_become(Destroyed));
        assert!(Retired.may_become(Active));
        assert!(
            !Active.may_become(Retired),
            "data on an active key must move first"
        );
        assert!(!Active.may_become(Destroyed));
        assert!(!Rotating.may_become(Destroyed));
        for s in KeyState::ALL {
            assert!(!Destroyed.may_become(s) || s == Destroyed);
            assert_eq!(s.as_str().parse::<KeyState>().unwrap(), s);
        }
        assert!(matches!(
            Active.check_transition(Destroyed, "k"),
            Err(EkmError::InvalidTransition { .. })
        ));
    }

    #[test]
    fn capabilities() {
        use KeyState::*;
        assert!(Active.can_encrypt() && Active.can_decrypt());
        assert!(!Rotating.can_encrypt() && Rotating.can_decrypt());
        for s in [Created, Retired, Destroyed] {
            assert!(!s.can_encrypt() && !s.can_decrypt());
        }
    }

    #[test]
    fn runbook_policy() {
        let p = Policy::default();
        let c = Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap();
        let a = p.evaluate(c, c + Duration::days(75), 0);
        assert_eq!(a.age_days, 75);
        assert_eq!(a.expires_in_days, 15);
        assert!(!a.needs_rotation);
        let a = p.evaluate(c, c + Duration::days(76), 0);
        assert!(a.needs_rotation);
        assert_eq!(a.due_at, c + Duration::days(76));
        // a short lifetime makes "fewer than 14 days remain" the earlier rule
        let short = Policy {
            lifetime_days: 20,
            ..p
        };
        let a = short.evaluate(c, c + Duration::days(6), 0);
        assert!(a.needs_rotation);
        assert_eq!(a.due_at, c + Duration::days(6));
        // the nonce budget
        assert!(p.evaluate(c, c, (NONCE_BOUND / 2.0) as i64).needs_rotation);
        assert!(!p.evaluate(c, c, 1000).needs_rotation);
    }
}
