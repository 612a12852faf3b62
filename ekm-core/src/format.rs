//! The ciphertext text format, version 1:
//!
//! ```text
//! ekm1:<base64url, no padding, of: key_ref(7) | nonce(12) | ciphertext(n) | tag(16)>
//! ```
//!
//! Text-safe (`[A-Za-z0-9_-]` after the prefix), self-describing (version in
//! the prefix, key in the first bytes), and compact: 85 characters for a
//! 25-byte value, against 156 for the runbook's `FERNET_V2:<key_id>:<token>`.
//! The GCM associated data is `"ekm1" | key_ref | context`, so neither the
//! header nor the context can be changed without the tag failing.

use crate::error::{EkmError, Result};
use crate::keyid::{KeyId, KEY_REF_LEN};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

pub const PREFIX: &str = "ekm1:";
pub const VERSION_TAG: &[u8; 4] = b"ekm1";
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Binary bytes before the ciphertext.
pub const HEADER_LEN: usize = KEY_REF_LEN + NONCE_LEN;
/// Binary bytes added to the plaintext.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;

/// Length of base64url (no padding) text for `n` bytes.
pub const fn b64_len(n: usize) -> usize {
    (n / 3) * 4
        + match n % 3 {
            0 => 0,
            1 => 2,
            _ => 3,
        }
}

/// Text length of the ciphertext of an `n`-byte plaintext.
pub const fn encoded_len(n: usize) -> usize {
    PREFIX.len() + b64_len(OVERHEAD + n)
}

/// Checks the prefix and returns the base64 body.
fn body(text: &str) -> Result<&str> {
    match text.strip_prefix(PREFIX) {
        Some(b) => Ok(b),
        None => {
            // "ekm<digits>:" is ours, from another format version.
            if let Some(rest) = text.strip_prefix("ekm") {
                if let Some(colon) = rest.find(':') {
                    let v = &rest[..colon];
                    if !v.is_empty() && v.len() <= 4 && v.bytes().all(|c| c.is_ascii_digit()) {
                        return Err(EkmError::UnsupportedVersion(format!("ekm{v}")));
                    }
                }
            }
            Err(EkmError::NotCiphertext)
        }
    }
}

/// Binary length of a ciphertext's body, validated against the minimum.
pub fn decoded_len(text: &str) -> Result<usize> {
    let b = body(text)?;
    let n = b.len();
    if n % 4 == 1 {
        return Err(EkmError::Malformed("impossible base64 length"));
    }
    let bytes = (n / 4) * 3
        + match n % 4 {
            2 => 1,
            3 => 2,
            _ => 0,
        };
    if bytes < OVERHEAD {
        return Err(EkmError::Malformed("too short"));
    }
    Ok(bytes)
}

/// The key a ciphertext names, read from its first 12 base64 characters only.
pub fn key_of(text: &str) -> Result<KeyId> {
    decoded_len(text)?;
    let b = body(text)?;
    let mut head = [0u8; 9];
    URL_SAFE_NO_PAD
        .decode_slice(&b.as_bytes()[..12], &mut head)
        .map_err(|_| EkmError::Malformed("invalid base64"))?;
    let mut r = [0u8; KEY_REF_LEN];
    r.copy_from_slice(&head[..KEY_REF_LEN]);
    KeyId::from_ref(&r)
}

/// Whether `text` is (syntactically) an ekm ciphertext of any version.
pub fn looks_encrypted(text: &str) -> bool {
    match decoded_len(text) {
        Ok(_) => true,
        Err(EkmError::UnsupportedVersion(_)) => true,
        Err(_) => false,
    }
}

/// Decodes the body of `text` into `out` (at least `decoded_len(text)` bytes),
/// returning the number of bytes written.
pub fn decode_into(text: &str, out: &mut [u8]) -> Result<usize> {
    let b = body(text)?;
    URL_SAFE_NO_PAD
        .decode_slice(b.as_bytes(), out)
        .map_err(|_| EkmError::Malformed("invalid base64"))
}

/// Writes `PREFIX + base64(bin)` into `out` (exactly `PREFIX.len() + b64_len(bin.len())` bytes).
pub fn encode_into(bin: &[u8], out: &mut [u8]) -> usize {
    out[..PREFIX.len()].copy_from_slice(PREFIX.as_bytes());
    let n = URL_SAFE_NO_PAD
        .encode_slice(bin, &mut out[PREFIX.len()..])
        .expect("caller sized the output with encoded_len");
    PREFIX.len() + n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths() {
        for n in 0..100 {
            let s = URL_SAFE_NO_PAD.encode(vec![0u8; n]);
            assert_eq!(s.len(), b64_len(n));
        }
        // The SPEC's compactness bound: a 25-byte value, at most 60% of Fernet's 156.
        assert_eq!(encoded_len(25), 85);
        assert!(encoded_len(25) <= 93);
    }

    #[test]
    fn classifies_foreign_values() {
        assert_eq!(decoded_len("hello"), Err(EkmError::NotCiphertext));
        assert_eq!(decoded_len(""), Err(EkmError::NotCiphertext));
        assert_eq!(
            decoded_len("FERNET_V2:key:abc"),
            Err(EkmError::NotCiphertext)
        );
        assert_eq!(
            decoded_len("ekm2:AAAA"),
            Err(EkmError::UnsupportedVersion("ekm2".into()))
        );
        assert!(matches!(
            decoded_len("ekm1:AAAA"),
            Err(EkmError::Malformed(_))
        ));
        assert!(matches!(decoded_len("ekm1:A"), Err(EkmError::Malformed(_))));
        assert!(!looks_encrypted("plain@example.com"));
        assert!(looks_encrypted("ekm7:whatever"));
    }
}
