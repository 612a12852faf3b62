//! Key ids: readable and sortable (`key_20250927_153045_b7c2`, as in the
//! runbook), made of `[a-z0-9_]` only so they can never break the ciphertext
//! syntax, and packed into 7 bytes inside each ciphertext (40-bit Unix
//! seconds + 16-bit suffix), which keeps ciphertexts short while
//! `ekm_key_id(ciphertext)` still returns the readable id with no lookup.

use crate::error::{EkmError, Result};
use chrono::{DateTime, NaiveDateTime, Utc};
use std::fmt;

/// Bytes of the packed key reference inside a ciphertext.
pub const KEY_REF_LEN: usize = 7;
const MAX_SECS: i64 = 253_402_300_799; // 9999-12-31 23:59:59 UTC: ids keep 4-digit years

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct KeyId {
    secs: i64,
    suffix: u16,
}

impl KeyId {
    pub fn new(created: DateTime<Utc>, suffix: u16) -> Result<Self> {
        let secs = created.timestamp();
        if !(0..=MAX_SECS).contains(&secs) {
            return Err(EkmError::Internal("key creation time out of range".into()));
        }
        Ok(KeyId { secs, suffix })
    }

    pub fn parse(s: &str) -> Result<Self> {
        let bad = || EkmError::InvalidKeyId(s.chars().take(64).collect());
        let b = s.as_bytes();
        // key_YYYYMMDD_HHMMSS_xxxx
        if b.len() != 24 || !s.starts_with("key_") || b[12] != b'_' || b[19] != b'_' {
            return Err(bad());
        }
        let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
        if !digits(4..12) || !digits(13..19) {
            return Err(bad());
        }
        let hexpart = &s[20..24];
        if !hexpart
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        {
            return Err(bad());
        }
        let dt = NaiveDateTime::parse_from_str(&s[4..19], "%Y%m%d_%H%M%S").map_err(|_| bad())?;
        let suffix = u16::from_str_radix(hexpart, 16).map_err(|_| bad())?;
        let id = KeyId::new(dt.and_utc(), suffix).map_err(|_| bad())?;
        // Canonical form only (rejects e.g. leap-second spellings).
        if id.to_string() != s {
            return Err(bad());
        }
        Ok(id)
    }

    pub fn created(&self) -> DateTime<Utc> {
        DateTime::from_timestamp(self.secs, 0).expect("range checked in new")
    }

    pub fn to_ref(&self) -> [u8; KEY_REF_LEN] {
        let s = (self.secs as u64).to_be_bytes();
        let x = self.suffix.to_be_bytes();
        [s[3], s[4], s[5], s[6], s[7], x[0], x[1]]
    }

    pub fn from_ref(r: &[u8; KEY_REF_LEN]) -> Result<Self> {
        let secs = i64::from_be_bytes([0, 0, 0, r[0], r[1], r[2], r[3], r[4]]);
        if secs > MAX_SECS {
            return Err(EkmError::Malformed("key reference out of range"));
        }
        Ok(KeyId {
            secs,
            suffix: u16::from_be_bytes([r[5], r[6]]),
        })
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "key_{}_{:04x}",
            self.created().format("%Y%m%d_%H%M%S"),
            self.suffix
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn readable_and_round_trips() {
        let t = Utc.with_ymd_and_hms(2025, 9, 27, 15, 30, 45).unwrap();
        let id = KeyId::new(t, 0xb7c2).unwrap();
        assert_eq!(id.to_string(), "key_20250927_153045_b7c2");
        assert_eq!(KeyId::parse("key_20250927_153045_b7c2").unwrap(), id);
        assert_eq!(KeyId::from_ref(&id.to_ref()).unwrap(), id);
        assert_eq!(id.created(), t);
    }

    #[test]
    fn rejects_anything_else() {
        for s in [
            "",
            "key_20250927_153045_b7c",
            "key_20250927_153045_B7C2",
            "key_20251327_153045_b7c2",
            "key_20250927_253045_b7c2",
            "key_20250927-153045_b7c2",
            "kex_20250927_153045_b7c2",
            "key_20250927_153045_b7c2 ",
            "key_2025092a_153045_b7c2",
            "key_20250927_153060_b7c2",
            "key_20250927_153045_b7:2",
        ] {
            assert!(
                matches!(KeyId::parse(s), Err(EkmError::InvalidKeyId(_))),
                "{s}"
            );
        }
    }

    #[test]
    fn order_follows_time() {
        let a = KeyId::parse("key_20250101_000000_ffff").unwrap();
        let b = KeyId::parse("key_20250101_000001_0000").unwrap();
        assert!(a < b);
        assert!(a.to_string() < b.to_string());
    }
}
