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

pub const PREFIX: &str = "ekm1:";
pub const VERSION_TAG: &[u8; 4] = b"ekm1";
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Binary bytes before the ciphertext.
pub const HEADER_LEN: usize = KEY_REF_LEN + NONCE_LEN;
/// Binary bytes added to the plaintext.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;

static B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const INVALID: u8 = 0xff;
static B64_DEC: [u8; 256] = {
    let mut t = [INVALID; 256];
    let mut i = 0;
    while i < 64 {
        t[B64[i] as usize] = i as u8;
        i += 1;
    }
    t
};

/// base64url without padding, canonical only (the unused low bits of the
/// last character must be zero). A table-driven codec: on the per-row path
/// this is a third of the work, and general-purpose engines cost several
/// times more for 80-character inputs.
pub fn b64_decode(src: &[u8], out: &mut [u8]) -> Result<usize> {
    if src.len() % 4 == 1 {
        return Err(EkmError::Malformed("impossible base64 length"));
    }
    if out.len() < src.len() / 4 * 3 {
        return Err(EkmError::Internal("base64 output buffer too small".into()));
    }
    // 16 characters -> 12 bytes at a time while a whole block remains (SIMD
    // where the CPU has SSSE3: detected at run time), then the rest (and
    // the final group) here.
    let done = simd::decode_blocks(src, out)?;
    let n = b64_decode_scalar(&src[done..], &mut out[done / 4 * 3..])?;
    Ok(done / 4 * 3 + n)
}

/// base64url 16 characters at a time with SSSE3, chosen at run time (the
/// build itself targets baseline x86-64, so it runs on every x86-64 CPU).
/// Not cryptography: an encoding, checked against the `base64` crate by
/// property tests.
#[cfg(target_arch = "x86_64")]
mod simd {
    use crate::error::{EkmError, Result};
    use std::arch::x86_64::*;

    /// Whether this CPU has SSSE3 (std caches the detection: one load).
    #[inline(always)]
    fn ssse3() -> bool {
        std::is_x86_feature_detected!("ssse3")
    }

    /// Decodes the whole 16-character blocks at the start of `src` (12 bytes
    /// each) and returns the characters consumed (a multiple of 16); any
    /// character outside the alphabet in them is an error. 0 without SSSE3.
    #[inline]
    pub fn decode_blocks(src: &[u8], out: &mut [u8]) -> Result<usize> {
        if ssse3() {
            // SAFETY: the CPU has SSSE3.
            unsafe { decode_blocks_ssse3(src, out) }
        } else {
            Ok(0)
        }
    }

    /// Encodes 12 bytes into 16 characters at a time while 16 bytes remain
    /// readable (a block loads 16, uses 12) and returns the bytes consumed (a
    /// multiple of 12). `out` needs 4/3 of them. 0 without SSSE3.
    #[inline]
    pub fn encode_blocks(src: &[u8], out: &mut [u8]) -> usize {
        if ssse3() {
            // SAFETY: the CPU has SSSE3.
            unsafe { encode_blocks_ssse3(src, out) }
        } else {
            0
        }
    }

    #[target_feature(enable = "ssse3")]
    unsafe fn decode_blocks_ssse3(src: &[u8], out: &mut [u8]) -> Result<usize> {
        let blocks = src.len() / 16;
        let mut bad = 0i32;
        unsafe {
            let ge = |c: __m128i, lo: u8| _mm_cmpgt_epi8(c, _mm_set1_epi8(lo as i8 - 1));
            let le = |c: __m128i, hi: u8| _mm_cmplt_epi8(c, _mm_set1_epi8(hi as i8 + 1));
            for b in 0..blocks {
                let c = _mm_loadu_si128(src.as_ptr().add(b * 16) as *const __m128i);
                let upper = _mm_and_si128(ge(c, b'A'), le(c, b'Z'));
                let lower = _mm_and_si128(ge(c, b'a'), le(c, b'z'));
                let digit = _mm_and_si128(ge(c, b'0'), le(c, b'9'));
                let dash = _mm_cmpeq_epi8(c, _mm_set1_epi8(b'-' as i8));
                let under = _mm_cmpeq_epi8(c, _mm_set1_epi8(b'_' as i8));
                let valid = _mm_or_si128(
                    _mm_or_si128(upper, lower),
                    _mm_or_si128(digit, _mm_or_si128(dash, under)),
                );
                bad |= _mm_movemask_epi8(valid) ^ 0xffff;
                // value = c + offset of its class (wrapping)
                let off = _mm_or_si128(
                    _mm_or_si128(
                        _mm_and_si128(upper, _mm_set1_epi8(-65)),
                        _mm_and_si128(lower, _mm_set1_epi8(-71)),
                    ),
                    _mm_or_si128(
                        _mm_and_si128(digit, _mm_set1_epi8(4)),
                        _mm_or_si128(
                            _mm_and_si128(dash, _mm_set1_epi8(17)),
                            _mm_and_si128(under, _mm_set1_epi8(-32)),
                        ),
                    ),
                );
                let v = _mm_add_epi8(c, off);
                // [a b c d] (6 bits each) -> 16-bit (a<<6|b), (c<<6|d) -> 32-bit 24 bits
                let ab_cd = _mm_maddubs_epi16(v, _mm_set1_epi32(0x0140_0140));
                let abcd = _mm_madd_epi16(ab_cd, _mm_set1_epi32(0x0001_1000));
                let bytes = _mm_shuffle_epi8(
                    abcd,
                    _mm_setr_epi8(2, 1, 0, 6, 5, 4, 10, 9, 8, 14, 13, 12, -1, -1, -1, -1),
                );
                let o = out.as_mut_ptr().add(b * 12);
                _mm_storel_epi64(o as *mut __m128i, bytes);
                std::ptr::write_unaligned(
                    o.add(8) as *mut i32,
                    _mm_cvtsi128_si32(_mm_srli_si128(bytes, 8)),
                );
            }
        }
        if bad != 0 {
            return Err(EkmError::Malformed("invalid base64"));
        }
        Ok(blocks * 16)
    }

    #[target_feature(enable = "ssse3")]
    unsafe fn encode_blocks_ssse3(src: &[u8], out: &mut [u8]) -> usize {
        if src.len() < 16 {
            return 0;
        }
        let blocks = (src.len() - 4) / 12;
        assert!(out.len() >= blocks * 16, "base64 output buffer too small");
        unsafe {
            for b in 0..blocks {
                let i = _mm_loadu_si128(src.as_ptr().add(b * 12) as *const __m128i);
                // each 3-byte group [a b c] -> [b a c b] (big-endian 24 bits in
                // 16-bit lanes), then the four 6-bit fields into four bytes
                let i = _mm_shuffle_epi8(
                    i,
                    _mm_setr_epi8(1, 0, 2, 1, 4, 3, 5, 4, 7, 6, 8, 7, 10, 9, 11, 10),
                );
                let t0 = _mm_and_si128(i, _mm_set1_epi32(0x0fc0_fc00));
                let t1 = _mm_mulhi_epu16(t0, _mm_set1_epi32(0x0400_0040));
                let t2 = _mm_and_si128(i, _mm_set1_epi32(0x003f_03f0));
                let t3 = _mm_mullo_epi16(t2, _mm_set1_epi32(0x0100_0010));
                let idx = _mm_or_si128(t1, t3);
                // index -> character: 0-25 'A'.., 26-51 'a'.., 52-61 '0'..,
                // 62 '-', 63 '_', as an offset chosen by a 4-bit class
                let class = _mm_or_si128(
                    _mm_subs_epu8(idx, _mm_set1_epi8(51)),
                    _mm_and_si128(_mm_cmpgt_epi8(_mm_set1_epi8(26), idx), _mm_set1_epi8(13)),
                );
                let offsets = _mm_setr_epi8(
                    71, -4, -4, -4, -4, -4, -4, -4, -4, -4, -4, -17, 32, 65, 0, 0,
                );
                let chars = _mm_add_epi8(idx, _mm_shuffle_epi8(offsets, class));
                _mm_storeu_si128(out.as_mut_ptr().add(b * 16) as *mut __m128i, chars);
            }
        }
        blocks * 12
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    pub fn decode_blocks(_src: &[u8], _out: &mut [u8]) -> crate::error::Result<usize> {
        Ok(0)
    }

    pub fn encode_blocks(_src: &[u8], _out: &mut [u8]) -> usize {
        0
    }
}

fn b64_decode_scalar(src: &[u8], out: &mut [u8]) -> Result<usize> {
    let bad = || EkmError::Malformed("invalid base64");
    if src.len() % 4 == 1 {
        return Err(EkmError::Malformed("impossible base64 length"));
    }
    let full = src.len() / 4;
    let need = full * 3
        + match src.len() % 4 {
            2 => 1,
            3 => 2,
            _ => 0,
        };
    if out.len() < need {
        return Err(EkmError::Internal("base64 output buffer too small".into()));
    }
    let d = |c: u8| B64_DEC[c as usize] as u32;
    let mut acc = 0u32;
    // 8 characters -> 6 bytes at a time, then the odd group of 4.
    let full8 = full / 2;
    for (s, o) in src[..full8 * 8]
        .chunks_exact(8)
        .zip(out[..full8 * 6].chunks_exact_mut(6))
    {
        let v = |i: usize| B64_DEC[s[i] as usize] as u64;
        let (a, b, c, d, e, f, g, h) = (v(0), v(1), v(2), v(3), v(4), v(5), v(6), v(7));
        acc |= (a | b | c | d | e | f | g | h) as u32;
        let n =
            (a << 42) | (b << 36) | (c << 30) | (d << 24) | (e << 18) | (f << 12) | (g << 6) | h;
        o.copy_from_slice(&n.to_be_bytes()[2..]);
    }
    for (s, o) in src[full8 * 8..full * 4]
        .chunks_exact(4)
        .zip(out[full8 * 6..full * 3].chunks_exact_mut(3))
    {
        let (a, b, c, e) = (d(s[0]), d(s[1]), d(s[2]), d(s[3]));
        acc |= a | b | c | e;
        let n = (a << 18) | (b << 12) | (c << 6) | e;
        o[0] = (n >> 16) as u8;
        o[1] = (n >> 8) as u8;
        o[2] = n as u8;
    }
    if acc & 0x80 != 0 {
        return Err(bad());
    }
    let rest = &src[full * 4..];
    let o = full * 3;
    match rest.len() {
        2 => {
            let (a, b) = (d(rest[0]), d(rest[1]));
            if (a | b) & 0x80 != 0 || b & 0x0f != 0 {
                return Err(bad());
            }
            out[o] = ((a << 2) | (b >> 4)) as u8;
        }
        3 => {
            let (a, b, c) = (d(rest[0]), d(rest[1]), d(rest[2]));
            if (a | b | c) & 0x80 != 0 || c & 0x03 != 0 {
                return Err(bad());
            }
            let n = (a << 18) | (b << 12) | (c << 6);
            out[o] = (n >> 16) as u8;
            out[o + 1] = (n >> 8) as u8;
        }
        _ => {}
    }
    Ok(need)
}

/// Encodes `src` as base64url without padding into `out` (at least
/// `b64_len(src.len())` bytes); returns the length written.
pub fn b64_encode(src: &[u8], out: &mut [u8]) -> usize {
    // 12 bytes -> 16 characters at a time (SIMD where the build has SSSE3),
    // then the rest here
    let done = simd::encode_blocks(src, out);
    done / 3 * 4 + b64_encode_scalar(&src[done..], &mut out[done / 3 * 4..])
}

fn b64_encode_scalar(src: &[u8], out: &mut [u8]) -> usize {
    let full = src.len() / 3;
    // 6 bytes -> 8 characters at a time, then the odd group of 3.
    let full6 = full / 2;
    for (s, o) in src[..full6 * 6]
        .chunks_exact(6)
        .zip(out[..full6 * 8].chunks_exact_mut(8))
    {
        let mut w = [0u8; 8];
        w[2..].copy_from_slice(s);
        let n = u64::from_be_bytes(w);
        for (i, c) in o.iter_mut().enumerate() {
            *c = B64[((n >> (42 - 6 * i)) & 63) as usize];
        }
    }
    for (s, o) in src[full6 * 6..full * 3]
        .chunks_exact(3)
        .zip(out[full6 * 8..full * 4].chunks_exact_mut(4))
    {
        let n = ((s[0] as u32) << 16) | ((s[1] as u32) << 8) | s[2] as u32;
        o[0] = B64[(n >> 18) as usize & 63];
        o[1] = B64[(n >> 12) as usize & 63];
        o[2] = B64[(n >> 6) as usize & 63];
        o[3] = B64[n as usize & 63];
    }
    let rest = &src[full * 3..];
    let o = full * 4;
    match rest.len() {
        1 => {
            let n = (rest[0] as u32) << 16;
            out[o] = B64[(n >> 18) as usize & 63];
            out[o + 1] = B64[(n >> 12) as usize & 63];
            o + 2
        }
        2 => {
            let n = ((rest[0] as u32) << 16) | ((rest[1] as u32) << 8);
            out[o] = B64[(n >> 18) as usize & 63];
            out[o + 1] = B64[(n >> 12) as usize & 63];
            out[o + 2] = B64[(n >> 6) as usize & 63];
            o + 3
        }
        _ => o,
    }
}

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

/// Checks the prefix and returns the base64 body (works on raw bytes: a
/// value that is not even UTF-8 is simply not ours).
pub fn body_bytes(text: &[u8]) -> Result<&[u8]> {
    match text.strip_prefix(PREFIX.as_bytes()) {
        Some(b) => Ok(b),
        None => {
            // "ekm<digits>:" is ours, from another format version.
            if let Some(rest) = text.strip_prefix(b"ekm") {
                if let Some(colon) = rest.iter().position(|&c| c == b':') {
                    let v = &rest[..colon];
                    if !v.is_empty() && v.len() <= 4 && v.iter().all(|c| c.is_ascii_digit()) {
                        return Err(EkmError::UnsupportedVersion(format!(
                            "ekm{}",
                            String::from_utf8_lossy(v)
                        )));
                    }
                }
            }
            Err(EkmError::NotCiphertext)
        }
    }
}

fn body(text: &str) -> Result<&str> {
    body_bytes(text.as_bytes()).map(|b| &text[text.len() - b.len()..])
}

/// Binary length of a base64 body of `n` characters, validated against the minimum.
pub fn decoded_len_of_body(n: usize) -> Result<usize> {
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

/// Binary length of a ciphertext's body, validated against the minimum.
pub fn decoded_len(text: &str) -> Result<usize> {
    decoded_len_of_body(body(text)?.len())
}

/// The key a ciphertext names, read from its first 12 base64 characters only.
pub fn key_of(text: &str) -> Result<KeyId> {
    decoded_len(text)?;
    let b = body(text)?;
    let mut head = [0u8; 9];
    b64_decode(&b.as_bytes()[..12], &mut head)?;
    let mut r = [0u8; KEY_REF_LEN];
    r.copy_from_slice(&head[..KEY_REF_LEN]);
    KeyId::from_ref(&r)
}

/// The key reference in the header of an ekm ciphertext (bytes of a text
/// value), or `None` when it is not one. Reads 12 characters; no allocation.
pub fn key_ref_of_bytes(text: &[u8]) -> Option<[u8; KEY_REF_LEN]> {
    let b = body_bytes(text).ok()?;
    decoded_len_of_body(b.len()).ok()?;
    let mut head = [0u8; 9];
    b64_decode(&b[..12], &mut head).ok()?;
    let mut r = [0u8; KEY_REF_LEN];
    r.copy_from_slice(&head[..KEY_REF_LEN]);
    Some(r)
}

/// Whether `text` is (syntactically) an ekm ciphertext of any version.
pub fn looks_encrypted(text: &str) -> bool {
    match decoded_len(text) {
        Ok(_) => true,
        Err(EkmError::UnsupportedVersion(_)) => true,
        Err(_) => false,
    }
}

/// The keys of every ekm ciphertext embedded anywhere in `text` (a whole
/// value, or inside a JSON document, an array's text form, a free-text
/// field): each `ekm1:` followed by base64url characters that form a
/// well-formed ciphertext, in order. For `ekm_scan_database`.
pub fn embedded_keys(text: &str) -> Vec<KeyId> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(i) = find(&bytes[at..], PREFIX.as_bytes()) {
        let start = at + i;
        let body = start + PREFIX.len();
        let end = body
            + bytes[body..]
                .iter()
                .take_while(|&&c| B64_DEC[c as usize] != INVALID)
                .count();
        // text is a str and the run is ASCII: a valid boundary
        if let Ok(k) = key_of(&text[start..end]) {
            out.push(k);
        }
        at = end.max(start + 1);
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Whether `text` is a ciphertext of another scheme that ekm cannot read and
/// must not encrypt again: the runbook's `FERNET_V2:<key id>:<token>` values
/// and bare Fernet tokens (urlsafe base64 of version byte 0x80, so they start
/// with `gAAAAA`, and at least 73 bytes: 100 characters or more, padded).
pub fn looks_foreign(text: &str) -> bool {
    if text.starts_with("FERNET_V2:") || text.starts_with("FERNET_V1:") {
        return true;
    }
    let b = text.as_bytes();
    b.len() >= 100
        && b.len().is_multiple_of(4)
        && text.starts_with("gAAAAA")
        && b.iter().enumerate().all(|(i, &c)| {
            c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || (c == b'=' && i >= b.len() - 2)
        })
}

/// Decodes the body of `text` into `out` (at least `decoded_len(text)` bytes),
/// returning the number of bytes written.
pub fn decode_into(text: &str, out: &mut [u8]) -> Result<usize> {
    b64_decode(body(text)?.as_bytes(), out)
}

/// Writes `PREFIX + base64(bin)` into `out` (exactly `PREFIX.len() + b64_len(bin.len())` bytes).
pub fn encode_into(bin: &[u8], out: &mut [u8]) -> usize {
    out[..PREFIX.len()].copy_from_slice(PREFIX.as_bytes());
    PREFIX.len() + b64_encode(bin, &mut out[PREFIX.len()..])
}

#[cfg(test)]
mod tests {
    #[test]
    fn foreign_values() {
        use super::looks_foreign;
        let token = format!("gAAAAA{}", "B".repeat(94));
        assert!(looks_foreign(&token));
        assert!(looks_foreign(&format!(
            "FERNET_V2:key_20250927_153045_b7c2:{token}"
        )));
        assert!(!looks_foreign("gAAAAA short"));
        assert!(!looks_foreign(&format!("gAAAAA{}", "B".repeat(93)))); // not a multiple of 4
        assert!(!looks_foreign(&format!("gAAAAA{} ", "B".repeat(93))));
        assert!(!looks_foreign("user@example.com"));
        assert!(!looks_foreign(""));
    }

    use super::*;

    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;

    #[test]
    fn codec_matches_the_reference_engine() {
        for n in 0..200usize {
            let data: Vec<u8> = (0..n).map(|i| (i * 37 + n) as u8).collect();
            let reference = URL_SAFE_NO_PAD.encode(&data);
            assert_eq!(reference.len(), b64_len(n));
            let mut out = vec![0u8; b64_len(n)];
            assert_eq!(b64_encode(&data, &mut out), reference.len());
            assert_eq!(out, reference.as_bytes());
            let mut back = vec![0u8; n];
            assert_eq!(b64_decode(reference.as_bytes(), &mut back), Ok(n));
            assert_eq!(back, data);
        }
        // non-canonical trailing bits and foreign characters are refused
        let mut buf = [0u8; 8];
        assert!(b64_decode(b"AB", &mut buf).is_err()); // 'B' leaves bits set
        assert!(b64_decode(b"AAB", &mut buf).is_err());
        assert!(b64_decode(b"AA==", &mut buf).is_err());
        assert!(b64_decode(b"A+/A", &mut buf).is_err());
        assert!(b64_decode(b"A", &mut buf).is_err());
    }

    #[test]
    fn embedded_keys_found_anywhere() {
        let k1 = KeyId::new(chrono::Utc::now(), 1).unwrap();
        let k2 = KeyId::new(chrono::Utc::now(), 2).unwrap();
        let mut bin1 = vec![0u8; OVERHEAD + 3];
        bin1[..KEY_REF_LEN].copy_from_slice(&k1.to_ref());
        let mut bin2 = vec![0u8; OVERHEAD + 5];
        bin2[..KEY_REF_LEN].copy_from_slice(&k2.to_ref());
        let enc = |b: &[u8]| {
            let mut o = vec![0u8; b64_len(b.len())];
            b64_encode(b, &mut o);
            format!("{PREFIX}{}", String::from_utf8(o).unwrap())
        };
        let (c1, c2) = (enc(&bin1), enc(&bin2));
        assert_eq!(embedded_keys(&c1), vec![k1]);
        let doc =
            format!("{{\"a\": \"{c1}\", \"b\": [\"{c2}\", \"ekm1:short\"], \"c\": \"ekm1:\"}}");
        assert_eq!(embedded_keys(&doc), vec![k1, k2]);
        assert_eq!(embedded_keys(&format!("{{{c2},{c1}}}")), vec![k2, k1]);
        assert!(embedded_keys("plain text, no ciphertext; ekm1 ekm1:").is_empty());
        assert!(embedded_keys("").is_empty());
        assert!(embedded_keys("é ekm1:€").is_empty());
    }

    #[test]
    fn lengths() {
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
