//! AES-256-GCM (NIST SP 800-38D, 96-bit nonces) for the values ekm
//! encrypts: a thin adapter over RustCrypto's `aes-gcm` crate, the vetted
//! implementation. ekm ships no cipher code of its own: the `aes` and
//! `polyval` crates underneath pick AES-NI and CLMUL (or their portable,
//! constant-time code) at run time, so one build runs on every x86-64.
//!
//! The adapter exists for its shape: in-place sealing and opening with a
//! detached tag (the per-row path formats ciphertext straight into the
//! result text), and re-encryption from one key to another in one buffer
//! that the caller wipes. The key schedule is computed once per key and
//! cached with it (`DataKey`); `aes-gcm`'s `zeroize` feature wipes it on
//! drop.
//!
//! Checked in tests/gcm.rs against the NIST vectors and, for random keys,
//! nonces, associated data and lengths, against `ring`.

pub const KEY_LEN: usize = 32;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;

/// The longest plaintext GCM may encrypt under one nonce (2^39 - 256
/// bits, NIST SP 800-38D): ekm refuses longer values explicitly.
pub const MAX_PLAINTEXT: usize = (1 << 36) - 32;

/// Authentication failed (wrong key, associated data, or altered value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unauthentic;

/// A plaintext longer than [`MAX_PLAINTEXT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLong;

use aes_gcm::aead::{AeadInOut, KeyInit};

/// An expanded AES-256-GCM key (`aes-gcm`; its key schedule is wiped on drop).
pub struct Gcm(aes_gcm::Aes256Gcm);

impl Gcm {
    pub fn new(key: &[u8; KEY_LEN]) -> Self {
        Gcm(aes_gcm::Aes256Gcm::new(key.into()))
    }

    /// Encrypts `buf` in place and returns the tag. `buf` must not be
    /// longer than [`MAX_PLAINTEXT`] (callers check it first:
    /// `DataKey::seal_into`); a longer one is refused, never truncated.
    pub fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], TooLong> {
        if buf.len() > MAX_PLAINTEXT {
            return Err(TooLong);
        }
        self.0
            .encrypt_inout_detached(nonce.into(), aad, buf.into())
            .map(Into::into)
            .map_err(|_| TooLong)
    }

    pub fn open_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), Unauthentic> {
        self.0
            .decrypt_inout_detached(nonce.into(), aad, buf.into(), tag.into())
            .map_err(|_| Unauthentic)
    }

    /// Opens `buf` under `old`, then seals it under this key (the
    /// plaintext is in `buf` in between: the caller's buffer is wiped).
    #[allow(clippy::too_many_arguments)]
    pub fn reseal_in_place(
        &self,
        old: &Gcm,
        old_nonce: &[u8; NONCE_LEN],
        old_aad: &[u8],
        old_tag: &[u8; TAG_LEN],
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], Unauthentic> {
        old.open_in_place(old_nonce, old_aad, buf, old_tag)?;
        // a value that opened is no longer than MAX_PLAINTEXT
        self.seal_in_place(nonce, aad, buf).map_err(|_| Unauthentic)
    }
}
