//! Fernet (<https://github.com/fernet/spec>), read so that the runbook's
//! data can move onto ekm keys. ekm decrypts Fernet and never writes it.
//!
//! ```text
//! token = base64url(0x80 | timestamp(8, big-endian) | IV(16) | AES-128-CBC(PKCS#7) | HMAC-SHA256(32))
//! key   = base64url(signing key(16) | encryption key(16))
//! ```
//!
//! The runbook (`EncryptionKeyManager`) stored `FERNET_V2:<key_id>:<token>`;
//! older rows hold a bare token (its V1 format), which is tried with every
//! key, newest first, as `MultiFernet` does.
//!
//! The primitives are RustCrypto's `aes` + `cbc` (with its PKCS#7 unpadding)
//! and `hmac` + `sha2`; this module only lays the token out. The HMAC is
//! verified (in constant time, by `hmac`) before anything is decrypted. A
//! key keeps its AES key schedule and its keyed HMAC state, so a value costs
//! no key setup.

use crate::error::{EkmError, Result};
use aes::cipher::block_padding::Pkcs7;
use aes::cipher::{BlockModeDecrypt, InnerIvInit, KeyInit};
use base64::Engine;
use hmac::{Hmac, KeyInit as MacKeyInit, Mac};
use sha2::Sha256;
use std::ops::Range;
use zeroize::Zeroizing;

/// The runbook's prefix: `FERNET_V2:<key_id>:<token>`.
pub const V2_PREFIX: &str = "FERNET_V2:";
/// Bytes of a Fernet key (signing key, then encryption key).
pub const KEY_LEN: usize = 32;
const VERSION: u8 = 0x80;
const IV_OFFSET: usize = 9;
const CT_OFFSET: usize = 25;
const MAC_LEN: usize = 32;
/// The shortest token: one block of ciphertext.
pub const MIN_TOKEN_BYTES: usize = CT_OFFSET + 16 + MAC_LEN;
/// Every token starts with these characters (0x80 and the high bytes of a
/// timestamp before 2106).
pub const TOKEN_START: &str = "gAAAAA";

type B64 = base64::engine::GeneralPurpose;
/// base64url with padding, as Python's `base64.urlsafe_b64encode` writes it.
const URLSAFE: B64 = base64::engine::general_purpose::URL_SAFE;
/// The same without padding (accepted for keys pasted without it).
const URLSAFE_NOPAD: B64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// A Fernet key: its AES-128 key schedule and its keyed HMAC-SHA256 state.
/// Both zeroize on drop.
#[derive(Clone)]
pub struct FernetKey {
    mac: Hmac<Sha256>,
    cipher: aes::Aes128,
}

impl FernetKey {
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Self {
        FernetKey {
            mac: <Hmac<Sha256> as MacKeyInit>::new_from_slice(&bytes[..16])
                .expect("HMAC takes keys of any length"),
            cipher: aes::Aes128::new_from_slice(&bytes[16..]).expect("16 bytes"),
        }
    }

    /// Decodes a key as Fernet writes it (`Fernet.generate_key()`: 44
    /// characters of base64url, padded; unpadded is accepted too). Errors
    /// never contain the text.
    pub fn decode(text: &str) -> Result<Zeroizing<[u8; KEY_LEN]>> {
        let text = text.trim();
        let mut buf = Zeroizing::new([0u8; KEY_LEN + 3]);
        let n = URLSAFE
            .decode_slice(text, &mut buf[..])
            .or_else(|_| URLSAFE_NOPAD.decode_slice(text, &mut buf[..]))
            .map_err(|_| EkmError::FernetKeyInvalid("it is not urlsafe base64"))?;
        if n != KEY_LEN {
            return Err(EkmError::FernetKeyInvalid(
                "it does not decode to 32 bytes (Fernet keys are 44 characters of urlsafe base64)",
            ));
        }
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        key.copy_from_slice(&buf[..KEY_LEN]);
        Ok(key)
    }

    /// Authenticates and decrypts a token (its base64 text) into `buf`
    /// (scratch of at least [`decoded_capacity`] bytes, wiped by the
    /// caller) and returns where the plaintext is in it. `who` names the key
    /// in errors.
    pub fn open_in(&self, token: &[u8], buf: &mut [u8], who: &str) -> Result<Range<usize>> {
        let n = decode_token(token, buf)?;
        let (signed, tag) = buf[..n].split_at(n - MAC_LEN);
        let mut mac = self.mac.clone();
        mac.update(signed);
        if mac.verify_slice(tag).is_err() {
            return Err(EkmError::FernetAuthenticationFailed(who.to_string()));
        }
        let iv: [u8; 16] = buf[IV_OFFSET..CT_OFFSET].try_into().expect("16 bytes");
        let dec = cbc::Decryptor::<aes::Aes128>::inner_iv_init(self.cipher.clone(), &iv.into());
        let len = dec
            .decrypt_padded::<Pkcs7>(&mut buf[CT_OFFSET..n - MAC_LEN])
            .map_err(|_| EkmError::FernetMalformed("its padding is wrong"))?
            .len();
        Ok(CT_OFFSET..CT_OFFSET + len)
    }
}

/// Bytes of scratch a token of `token_len` characters decodes into.
pub fn decoded_capacity(token_len: usize) -> usize {
    token_len / 4 * 3 + 3
}

/// Decodes a token's base64 into `buf` and checks its shape (version, a
/// whole number of blocks); returns its length.
fn decode_token(token: &[u8], buf: &mut [u8]) -> Result<usize> {
    let n = URLSAFE
        .decode_slice(token, buf)
        .map_err(|_| EkmError::FernetMalformed("it is not urlsafe base64"))?;
    if n < MIN_TOKEN_BYTES {
        return Err(EkmError::FernetMalformed("it is too short"));
    }
    if buf[0] != VERSION {
        return Err(EkmError::FernetMalformed("its version byte is not 0x80"));
    }
    if !(n - CT_OFFSET - MAC_LEN).is_multiple_of(16) {
        return Err(EkmError::FernetMalformed(
            "its ciphertext is not a whole number of blocks",
        ));
    }
    Ok(n)
}

/// A value in one of the runbook's formats.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum FernetValue<'a> {
    /// `FERNET_V2:<key_id>:<token>`
    V2 { key_id: &'a str, token: &'a [u8] },
    /// a bare token (the runbook's V1)
    Bare { token: &'a [u8] },
}

impl<'a> FernetValue<'a> {
    pub fn token(&self) -> &'a [u8] {
        match self {
            FernetValue::V2 { token, .. } | FernetValue::Bare { token } => token,
        }
    }
}

/// Whether `v` is in a runbook format: `FERNET_V2:<key_id>:<token>` (an id
/// of the form ekm imports; any token text: a damaged one is an error when
/// decrypted, not plaintext), or
/// a bare token: `gAAAAA`, base64url with padding, at least the shortest
/// token's length. Other text is not Fernet.
pub fn parse(v: &[u8]) -> Option<FernetValue<'_>> {
    if let Some(rest) = v.strip_prefix(V2_PREFIX.as_bytes()) {
        let colon = rest.iter().position(|&c| c == b':')?;
        let id = &rest[..colon];
        // an id ekm could have imported: anything else is not named in
        // errors and hints (it is another scheme's text)
        if id.is_empty()
            || id.len() > MAX_ID_LEN
            || !id[0].is_ascii_alphanumeric()
            || !id.iter().all(|&c| id_byte(c))
        {
            return None;
        }
        let key_id = std::str::from_utf8(id).ok()?;
        return Some(FernetValue::V2 {
            key_id,
            token: &rest[colon + 1..],
        });
    }
    let min_chars = MIN_TOKEN_BYTES.div_ceil(3) * 4;
    if v.len() >= min_chars
        && v.len().is_multiple_of(4)
        && v.starts_with(TOKEN_START.as_bytes())
        && v.iter().enumerate().all(|(i, &c)| {
            c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || (c == b'=' && i + 2 >= v.len())
        })
    {
        return Some(FernetValue::Bare { token: v });
    }
    None
}

/// A byte of a token's base64url text (padding aside).
fn token_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'-' || c == b'_'
}

/// A byte of an imported key's id (`[A-Za-z0-9][A-Za-z0-9_.-]{0,99}`).
fn id_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-')
}

/// Longest key id ekm imports.
pub const MAX_ID_LEN: usize = 100;

/// Every runbook value inside `text`, whole or embedded (in JSON, an array's
/// text form, free text), for a scan of the database:
/// `FERNET_V2:<key_id>:<token>` with an id of the form ekm imports, and bare
/// tokens (a run of base64url that starts `gAAAAA` after a byte that is not
/// base64url, and that [`parse`] takes for a token). Nothing is decoded.
pub fn embedded(text: &[u8]) -> Vec<FernetValue<'_>> {
    // the end of the token text starting at `from`: base64url, then at most
    // two `=`
    let token_end = |from: usize| {
        let mut e = from + text[from..].iter().take_while(|&&c| token_byte(c)).count();
        for _ in 0..2 {
            if text.get(e) == Some(&b'=') {
                e += 1;
            }
        }
        e
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < text.len() {
        if text[i..].starts_with(V2_PREFIX.as_bytes()) {
            let id_start = i + V2_PREFIX.len();
            let id_len = text[id_start..]
                .iter()
                .take(MAX_ID_LEN + 1)
                .take_while(|&&c| id_byte(c))
                .count();
            let colon = id_start + id_len;
            if (1..=MAX_ID_LEN).contains(&id_len)
                && text[id_start].is_ascii_alphanumeric()
                && text.get(colon) == Some(&b':')
            {
                let end = token_end(colon + 1);
                if end > colon + 1 {
                    out.push(FernetValue::V2 {
                        key_id: std::str::from_utf8(&text[id_start..colon]).expect("ASCII"),
                        token: &text[colon + 1..end],
                    });
                    i = end;
                    continue;
                }
            }
            i += 1;
            continue;
        }
        if text[i] == TOKEN_START.as_bytes()[0]
            && (i == 0 || !token_byte(text[i - 1]))
            && text[i..].starts_with(TOKEN_START.as_bytes())
        {
            let end = token_end(i);
            if let Some(v @ FernetValue::Bare { .. }) = parse(&text[i..end]) {
                out.push(v);
            }
            i = end;
            continue;
        }
        i += 1;
    }
    out
}

/// The time a token was made (seconds since the epoch), from its
/// unauthenticated header: for audits, never for decisions.
pub fn token_time(token: &[u8]) -> Result<u64> {
    // input-sized: allocated fallibly (crypto::try_zeroed)
    let mut buf = Zeroizing::new(crate::alloc::try_zeroed(decoded_capacity(token.len()))?);
    decode_token(token, &mut buf)?;
    Ok(u64::from_be_bytes(buf[1..9].try_into().expect("8 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_ids_of_the_imported_form_only() {
        let t = format!("{TOKEN_START}{}", "A".repeat(92)) + "==";
        for bad in ["", "-x", "a'b", "a b", "a\nb", &"a".repeat(101)] {
            assert_eq!(
                parse(format!("FERNET_V2:{bad}:{t}").as_bytes()),
                None,
                "{bad:?}"
            );
        }
        for good in ["k", "key_20250927_abc123", "a.b-c_d", &"a".repeat(100)] {
            assert!(matches!(
                parse(format!("FERNET_V2:{good}:{t}").as_bytes()),
                Some(FernetValue::V2 { .. })
            ));
        }
    }

    #[test]
    fn embedded_values() {
        let t = format!("{TOKEN_START}{}", "A".repeat(92)) + "==";
        let t2 = format!("{TOKEN_START}{}", "B".repeat(94));
        // whole values
        assert_eq!(
            embedded(t.as_bytes()),
            vec![FernetValue::Bare {
                token: t.as_bytes()
            }]
        );
        let v2 = format!("FERNET_V2:key_20250927_abc123:{t}");
        assert_eq!(
            embedded(v2.as_bytes()),
            vec![FernetValue::V2 {
                key_id: "key_20250927_abc123",
                token: t.as_bytes()
            }]
        );
        // in JSON, an array's text form and free text, several at once
        let json = format!(r#"{{"old": "{v2}", "older": ["{t2}"], "note": "was {t}."}}"#);
        assert_eq!(
            embedded(json.as_bytes()),
            vec![
                FernetValue::V2 {
                    key_id: "key_20250927_abc123",
                    token: t.as_bytes()
                },
                FernetValue::Bare {
                    token: t2.as_bytes()
                },
                FernetValue::Bare {
                    token: t.as_bytes()
                },
            ]
        );
        let arr = format!("{{{t},NULL,\"FERNET_V2:k.1-x:{t2}\"}}");
        assert_eq!(
            embedded(arr.as_bytes()),
            vec![
                FernetValue::Bare {
                    token: t.as_bytes()
                },
                FernetValue::V2 {
                    key_id: "k.1-x",
                    token: t2.as_bytes()
                },
            ]
        );
        // not values: inside another base64 run, too short, a bad id, no token
        assert!(embedded(format!("x{t}").as_bytes()).is_empty());
        assert!(embedded(b"gAAAAAshort").is_empty());
        assert!(embedded(format!("FERNET_V2:-bad:{t}").as_bytes()).len() == 1); // the token itself
        assert!(embedded(format!("FERNET_V2:{}:{t}", "a".repeat(101)).as_bytes()).len() == 1);
        assert!(embedded(b"FERNET_V2:key:").is_empty());
        assert!(embedded(b"plain text, FERNET_V2 mentioned").is_empty());
        assert!(embedded(b"").is_empty());
    }

    #[test]
    fn parse_formats() {
        let t = format!("{TOKEN_START}{}", "A".repeat(92)) + "==";
        assert_eq!(
            parse(t.as_bytes()),
            Some(FernetValue::Bare {
                token: t.as_bytes()
            })
        );
        let v2 = format!("FERNET_V2:key_20250927_abc123:{t}");
        assert_eq!(
            parse(v2.as_bytes()),
            Some(FernetValue::V2 {
                key_id: "key_20250927_abc123",
                token: t.as_bytes()
            })
        );
        assert_eq!(parse(b"FERNET_V2::x"), None);
        assert_eq!(parse(b"FERNET_V2:nocolon"), None);
        assert_eq!(parse(b"gAAAAAshort"), None);
        assert_eq!(parse(b"hello@example.com"), None);
        assert_eq!(parse(b"ekm1:AAAA"), None);
        let bad = format!("{TOKEN_START}{}", "A=".repeat(48));
        assert_eq!(parse(bad.as_bytes()), None);
    }

    #[test]
    fn key_decoding() {
        let k = FernetKey::decode("cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=").unwrap();
        assert_eq!(k.len(), 32);
        FernetKey::decode("cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4").unwrap();
        let e = FernetKey::decode("cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpw=").unwrap_err();
        assert!(matches!(e, EkmError::FernetKeyInvalid(_)));
        assert!(!e.to_string().contains("cw_0x"));
        let e = FernetKey::decode("not base64 at all!").unwrap_err();
        assert!(matches!(e, EkmError::FernetKeyInvalid(_)));
    }
}
