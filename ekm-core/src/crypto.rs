//! Envelope encryption: data keys (DEKs) encrypt values; the master key
//! (KEK) wraps data keys. Both are AES-256-GCM. Key bytes live in
//! `Zeroizing` buffers and cipher states zeroize their round keys on drop.

use crate::error::{EkmError, Result};
use crate::format::{self, HEADER_LEN, NONCE_LEN, OVERHEAD, TAG_LEN, VERSION_TAG};
use crate::keyid::{KeyId, KEY_REF_LEN};
use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use rand::rngs::SysRng;
use rand::TryRng;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::atomic::{compiler_fence, Ordering};
use zeroize::Zeroizing;

pub const KEY_LEN: usize = 32;
/// Bytes of a wrapped data key: nonce | encrypted key | tag.
pub const WRAPPED_LEN: usize = NONCE_LEN + KEY_LEN + TAG_LEN;
/// Bytes of the master key check value stored with each wrapped key.
pub const KCV_LEN: usize = 8;

pub use crate::alloc::{try_copy_str, try_zeroed};

/// Fills `buf` from the operating system's random source.
pub fn os_random(buf: &mut [u8]) -> Result<()> {
    SysRng
        .try_fill_bytes(buf)
        .map_err(|e| EkmError::Internal(format!("OS random source failed: {e}")))
}

pub struct DataKey {
    id: KeyId,
    key_ref: [u8; KEY_REF_LEN],
    /// The expanded key (round keys, GHASH powers): boxed, wiped on drop.
    cipher: Box<crate::gcm::Gcm>,
}

/// A 512-byte stack buffer for short secrets (a plaintext on its way in or
/// out). Nothing is written up front: [`take`](Self::take) zeroes only the
/// bytes it hands out, and drop wipes them with 8-byte volatile stores. On
/// the per-row path a 512-byte memset plus a byte-by-byte wipe cost more than
/// the cipher itself.
#[repr(C, align(16))]
pub struct StackSecret {
    words: [MaybeUninit<u64>; 64],
    /// words handed out (written) so far
    used: usize,
}

impl StackSecret {
    pub const LEN: usize = 512;

    #[inline(always)]
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        StackSecret {
            words: [const { MaybeUninit::uninit() }; 64],
            used: 0,
        }
    }

    /// The first `n` bytes, zeroed (`n` at most [`LEN`](Self::LEN)).
    #[inline]
    pub fn take(&mut self, n: usize) -> &mut [u8] {
        assert!(n <= Self::LEN, "StackSecret holds at most 512 bytes");
        let w = n.div_ceil(8);
        for x in &mut self.words[..w] {
            x.write(0);
        }
        self.used = self.used.max(w);
        // SAFETY: the first `w * 8 >= n` bytes were just initialized.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut u8, n) }
    }
}

impl Drop for StackSecret {
    fn drop(&mut self) {
        for x in &mut self.words[..self.used] {
            // SAFETY: an aligned, initialized u64 of this buffer.
            unsafe { std::ptr::write_volatile(x.as_mut_ptr(), 0) };
        }
        compiler_fence(Ordering::SeqCst);
    }
}

/// Scratch for a secret of any size: the stack for up to 512 bytes, else
/// the heap; wiped on drop.
pub struct SecretBuf {
    stack: StackSecret,
    heap: Vec<u8>,
}

impl SecretBuf {
    #[inline(always)]
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        SecretBuf {
            stack: StackSecret::new(),
            heap: Vec::new(),
        }
    }

    /// `n` zeroed bytes (`OutOfMemory` if the heap cannot hold them).
    #[inline]
    pub fn take(&mut self, n: usize) -> Result<&mut [u8]> {
        if n <= StackSecret::LEN {
            Ok(self.stack.take(n))
        } else {
            self.wipe_heap();
            self.heap.clear();
            self.heap
                .try_reserve_exact(n)
                .map_err(|_| EkmError::OutOfMemory(n))?;
            self.heap.resize(n, 0);
            Ok(&mut self.heap[..])
        }
    }

    /// Wipes the heap buffer, if it was ever used: zeroize of an empty Vec
    /// still calls memset on its dangling pointer, and glibc's AVX-512
    /// memset then takes a masked store on an unmapped page (a microcode
    /// assist that cost more than the whole cipher, per value).
    fn wipe_heap(&mut self) {
        if self.heap.capacity() > 0 {
            zeroize::Zeroize::zeroize(&mut self.heap);
        }
    }
}

impl Drop for SecretBuf {
    fn drop(&mut self) {
        self.wipe_heap();
    }
}

/// The associated data `"ekm1" | key_ref | context`. Not secret: built on
/// the stack for contexts up to 53 bytes, without zero-filling first.
struct Aad {
    stack: [MaybeUninit<u8>; 64],
    len: usize,
    heap: Vec<u8>,
}

#[cfg(target_arch = "x86_64")]
/// Little-endian value of the first `n` <= 8 bytes at `p`, read with at
/// most two overlapping loads.
#[inline(always)]
unsafe fn le_bytes(p: *const u8, n: usize) -> u64 {
    unsafe {
        if n >= 8 {
            (p as *const u64).read_unaligned()
        } else if n >= 4 {
            let lo = (p as *const u32).read_unaligned() as u64;
            let hi = ((p.add(n - 4) as *const u32).read_unaligned() as u64) >> ((8 - n) * 8);
            lo | (hi << 32)
        } else if n > 0 {
            (*p as u64)
                | ((*p.add(n / 2) as u64) << (n / 2 * 8))
                | ((*p.add(n - 1) as u64) << ((n - 1) * 8))
        } else {
            0
        }
    }
}

/// Writes `"ekm1" | key_ref | context` at `p` as whole 16-byte blocks (zero
/// padded): GHASH reads the associated data right after, in 16-byte blocks,
/// and a load that straddles several narrower stores still in flight cannot
/// be forwarded and stalls.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn write_aad(p: *mut u8, key_ref: &[u8; KEY_REF_LEN], context: &[u8]) {
    use std::arch::x86_64::*;
    const _: () = assert!(VERSION_TAG.len() + KEY_REF_LEN == 11);
    unsafe {
        let first = context.len().min(5);
        let lo = u32::from_le_bytes(*VERSION_TAG) as u64 | (le_bytes(key_ref.as_ptr(), 4) << 32);
        let hi = le_bytes(key_ref.as_ptr().add(4), 3) | (le_bytes(context.as_ptr(), first) << 24);
        _mm_storeu_si128(p as *mut __m128i, _mm_set_epi64x(hi as i64, lo as i64));
        let (mut at, mut src) = (16, first);
        while src < context.len() {
            let n = (context.len() - src).min(16);
            let c = context.as_ptr().add(src);
            let lo = le_bytes(c, n.min(8));
            let hi = if n > 8 { le_bytes(c.add(8), n - 8) } else { 0 };
            _mm_storeu_si128(
                p.add(at) as *mut __m128i,
                _mm_set_epi64x(hi as i64, lo as i64),
            );
            at += 16;
            src += n;
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
unsafe fn write_aad(p: *mut u8, key_ref: &[u8; KEY_REF_LEN], context: &[u8]) {
    unsafe {
        std::ptr::copy_nonoverlapping(VERSION_TAG.as_ptr(), p, 4);
        std::ptr::copy_nonoverlapping(key_ref.as_ptr(), p.add(4), KEY_REF_LEN);
        std::ptr::copy_nonoverlapping(context.as_ptr(), p.add(4 + KEY_REF_LEN), context.len());
    }
}

impl Aad {
    #[inline(always)]
    fn new(key_ref: &[u8; KEY_REF_LEN], context: &[u8]) -> Result<Self> {
        let len = VERSION_TAG.len() + KEY_REF_LEN + context.len();
        let mut a = Aad {
            stack: [const { MaybeUninit::uninit() }; 64],
            len,
            heap: Vec::new(),
        };
        if len <= 64 {
            let p = a.stack.as_mut_ptr() as *mut u8;
            // SAFETY: 4 + 7 + context.len() = len <= 64 bytes, all written
            // here (on x86-64, in whole 16-byte blocks within the 64).
            unsafe { write_aad(p, key_ref, context) };
        } else {
            a.heap
                .try_reserve_exact(len)
                .map_err(|_| EkmError::OutOfMemory(len))?;
            a.heap.extend_from_slice(VERSION_TAG);
            a.heap.extend_from_slice(key_ref);
            a.heap.extend_from_slice(context);
        }
        Ok(a)
    }

    #[inline(always)]
    fn as_slice(&self) -> &[u8] {
        if self.len <= 64 {
            // SAFETY: the first `len` bytes were written in `new`.
            unsafe { std::slice::from_raw_parts(self.stack.as_ptr() as *const u8, self.len) }
        } else {
            &self.heap
        }
    }
}

impl DataKey {
    pub fn new(id: KeyId, bytes: &[u8; KEY_LEN]) -> Self {
        DataKey {
            id,
            key_ref: id.to_ref(),
            cipher: Box::new(crate::gcm::Gcm::new(bytes)),
        }
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    /// Encrypts `plaintext` with `nonce` and writes the text form into `out`,
    /// which must be exactly `format::encoded_len(plaintext.len())` bytes.
    pub fn seal_into(
        &self,
        nonce: &[u8; NONCE_LEN],
        plaintext: &[u8],
        context: &[u8],
        out: &mut [u8],
    ) -> Result<()> {
        if plaintext.len() > crate::gcm::MAX_PLAINTEXT {
            return Err(EkmError::TooLong(plaintext.len()));
        }
        let mut scratch = SecretBuf::new();
        let bin = scratch.take(OVERHEAD + plaintext.len())?;
        bin[..KEY_REF_LEN].copy_from_slice(&self.key_ref);
        bin[KEY_REF_LEN..HEADER_LEN].copy_from_slice(nonce);
        let (body, tag_out) = bin[HEADER_LEN..].split_at_mut(plaintext.len());
        body.copy_from_slice(plaintext);
        let aad = Aad::new(&self.key_ref, context)?;
        let tag = self
            .cipher
            .seal_in_place(nonce, aad.as_slice(), body)
            .map_err(|_| EkmError::TooLong(plaintext.len()))?;
        tag_out.copy_from_slice(&tag);
        let n = format::encode_into(bin, out);
        debug_assert_eq!(n, out.len());
        Ok(())
    }

    /// Convenience form of [`seal_into`](Self::seal_into).
    pub fn seal(
        &self,
        nonce: &[u8; NONCE_LEN],
        plaintext: &[u8],
        context: &[u8],
    ) -> Result<String> {
        let mut out = try_zeroed(format::encoded_len(plaintext.len()))?;
        self.seal_into(nonce, plaintext, context, &mut out)?;
        Ok(String::from_utf8(out).expect("base64 is ASCII"))
    }

    /// Decodes and decrypts `text` inside `buf` (at least
    /// `format::decoded_len(text)` bytes) and returns where the plaintext is.
    pub fn open_in(&self, text: &str, context: &[u8], buf: &mut [u8]) -> Result<Range<usize>> {
        let n = format::decode_into(text, buf)?;
        self.open_decoded(&mut buf[..n], context)
    }

    /// The length of a decoded body (`key_ref | nonce | ciphertext | tag`)
    /// that names this key and is long enough to hold a value.
    fn check_decoded(&self, bin: &[u8]) -> Result<usize> {
        if bin.len() < OVERHEAD {
            return Err(EkmError::Malformed("too short"));
        }
        if bin[..KEY_REF_LEN] != self.key_ref {
            return Err(EkmError::Internal(
                "ciphertext opened with a key it does not name".into(),
            ));
        }
        Ok(bin.len())
    }

    /// Decrypts an already decoded body (`key_ref | nonce | ciphertext | tag`)
    /// in place and returns where the plaintext is.
    pub fn open_decoded(&self, bin: &mut [u8], context: &[u8]) -> Result<Range<usize>> {
        let n = self.check_decoded(bin)?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&bin[KEY_REF_LEN..HEADER_LEN]);
        let aad = Aad::new(&self.key_ref, context)?;
        let (body, tag) = bin[HEADER_LEN..].split_at_mut(n - HEADER_LEN - TAG_LEN);
        let tag: &[u8; TAG_LEN] = (&*tag).try_into().expect("16-byte tag");
        self.cipher
            .open_in_place(&nonce, aad.as_slice(), body, tag)
            .map_err(|_| EkmError::AuthenticationFailed(self.id.to_string()))?;
        Ok(HEADER_LEN..n - TAG_LEN)
    }

    /// Re-encrypts a decoded value of `old` under this key, in place: `bin`
    /// (`key_ref | nonce | ciphertext | tag` of `old`) is authenticated, then
    /// turned into this key's ciphertext with `nonce`, and its text form is
    /// written into `out` (exactly `format::encoded_len(plaintext length)`
    /// bytes, the length of the old text). `bin` holds the plaintext in
    /// between (opened, then sealed in place): the caller's buffer is wiped
    /// scratch (`SecretBuf`).
    pub fn reseal(
        &self,
        old: &DataKey,
        bin: &mut [u8],
        context: &[u8],
        nonce: &[u8; NONCE_LEN],
        out: &mut [u8],
    ) -> Result<()> {
        let n = old.check_decoded(bin)?;
        if out.len() != format::encoded_len(n - OVERHEAD) {
            return Err(EkmError::Internal(
                "re-encryption output buffer of the wrong size".into(),
            ));
        }
        let mut old_nonce = [0u8; NONCE_LEN];
        old_nonce.copy_from_slice(&bin[KEY_REF_LEN..HEADER_LEN]);
        let mut old_tag = [0u8; TAG_LEN];
        old_tag.copy_from_slice(&bin[n - TAG_LEN..]);
        let old_aad = Aad::new(&old.key_ref, context)?;
        let aad = Aad::new(&self.key_ref, context)?;
        let tag = self
            .cipher
            .reseal_in_place(
                &old.cipher,
                &old_nonce,
                old_aad.as_slice(),
                &old_tag,
                nonce,
                aad.as_slice(),
                &mut bin[HEADER_LEN..n - TAG_LEN],
            )
            .map_err(|_| EkmError::AuthenticationFailed(old.id.to_string()))?;
        bin[..KEY_REF_LEN].copy_from_slice(&self.key_ref);
        bin[KEY_REF_LEN..HEADER_LEN].copy_from_slice(nonce);
        bin[n - TAG_LEN..].copy_from_slice(&tag);
        format::encode_into(bin, out);
        Ok(())
    }

    /// Convenience form of [`open_in`](Self::open_in).
    pub fn open(&self, text: &str, context: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let mut buf = Zeroizing::new(try_zeroed(format::decoded_len(text)?)?);
        let r = self.open_in(text, context, &mut buf)?;
        buf.copy_within(r.clone(), 0);
        buf.truncate(r.len());
        Ok(buf)
    }
}

/// The fingerprint a stored check value names (see [`MasterKey::fingerprint`]).
pub fn fingerprint_of(kcv: &[u8]) -> String {
    hex::encode(kcv)
}

/// The key-encryption key. Never stored in the database, never printed.
pub struct MasterKey(Zeroizing<[u8; KEY_LEN]>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl MasterKey {
    /// Parses 64 hex digits or standard base64 of 32 bytes, surrounded by
    /// optional whitespace. `source` names where it came from, for errors.
    pub fn parse(text: &[u8], source: &str) -> Result<Self> {
        let t = text.trim_ascii();
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        let ok = if t.len() == 64 {
            hex::decode_to_slice(t, &mut k[..]).is_ok()
        } else if t.len() == 44 {
            let mut tmp = Zeroizing::new([0u8; 33]);
            matches!(
                base64::Engine::decode_slice(
                    &base64::engine::general_purpose::STANDARD,
                    t,
                    &mut tmp[..]
                ),
                Ok(KEY_LEN)
            ) && {
                k.copy_from_slice(&tmp[..KEY_LEN]);
                true
            }
        } else {
            false
        };
        if !ok {
            return Err(EkmError::MasterKeyInvalid(source.to_string()));
        }
        Ok(MasterKey(k))
    }

    pub fn generate() -> Result<Self> {
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        os_random(&mut k[..])?;
        Ok(MasterKey(k))
    }

    /// Hex form, for writing the development key file.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(&self.0[..]))
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new((&*self.0).into())
    }

    /// A key check value: the GCM tag of an empty message under a fixed,
    /// wrap-reserved nonce. It identifies the master key without revealing it.
    pub fn check_value(&self) -> [u8; KCV_LEN] {
        let nonce = Nonce::from([0xffu8; NONCE_LEN]);
        let tag = self
            .cipher()
            .encrypt_inout_detached(&nonce, b"ekm master key check v1", (&mut [][..]).into())
            .expect("empty message");
        let mut out = [0u8; KCV_LEN];
        out.copy_from_slice(&tag[..KCV_LEN]);
        out
    }

    /// Wraps a data key, bound to its id.
    pub fn wrap(&self, id: &KeyId, dek: &[u8; KEY_LEN]) -> Result<Vec<u8>> {
        self.wrap_labeled(&KeyKind::Ekm.label(&id.to_string()), dek)
    }

    /// Wraps 32 bytes of key material bound to `label` (the associated
    /// data: the key's kind and id, [`KeyKind::label`]).
    pub fn wrap_labeled(&self, label: &str, dek: &[u8; KEY_LEN]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        loop {
            os_random(&mut nonce)?;
            if nonce != [0xff; NONCE_LEN] {
                break; // reserved for the check value
            }
        }
        let mut out = vec![0u8; WRAPPED_LEN];
        out[..NONCE_LEN].copy_from_slice(&nonce);
        out[NONCE_LEN..NONCE_LEN + KEY_LEN].copy_from_slice(dek);
        let tag = self
            .cipher()
            .encrypt_inout_detached(
                &Nonce::from(nonce),
                label.as_bytes(),
                (&mut out[NONCE_LEN..NONCE_LEN + KEY_LEN]).into(),
            )
            .map_err(|_| EkmError::Internal("wrap failed".into()))?;
        out[NONCE_LEN + KEY_LEN..].copy_from_slice(&tag);
        Ok(out)
    }

    /// The master key's fingerprint: its check value in hex (a MAC of a
    /// fixed label under the key; it names the key, never reveals it). Every
    /// wrapped key stores the check value of the master key that wrapped it.
    pub fn fingerprint(&self) -> String {
        hex::encode(self.check_value())
    }

    /// Re-wraps key material wrapped under this master key (`wrapped`, with
    /// its check value `kcv`, bound to the key's kind and id) under `new`:
    /// the wrapped form and `new`'s check value. The key itself never
    /// changes, so every value stays as it is; it exists unwrapped only in a
    /// buffer wiped on return.
    pub fn rewrap(
        &self,
        new: &MasterKey,
        kind: KeyKind,
        id: &str,
        wrapped: &[u8],
        kcv: &[u8],
    ) -> Result<(Vec<u8>, [u8; KCV_LEN])> {
        let label = kind.label(id);
        let dek = self.unwrap_labeled(&label, id, wrapped, kcv)?;
        Ok((new.wrap_labeled(&label, &dek)?, new.check_value()))
    }

    /// Unwraps a data key. `kcv` is the check value stored with it: a
    /// mismatch means the wrong master key is configured.
    pub fn unwrap(&self, id: &KeyId, wrapped: &[u8], kcv: &[u8]) -> Result<DataKey> {
        let name = id.to_string();
        let k = self.unwrap_labeled(&KeyKind::Ekm.label(&name), &name, wrapped, kcv)?;
        Ok(DataKey::new(*id, &k))
    }

    /// Unwraps an imported Fernet key (`ekm_import_fernet_key`).
    pub fn unwrap_fernet(
        &self,
        id: &str,
        wrapped: &[u8],
        kcv: &[u8],
    ) -> Result<crate::fernet::FernetKey> {
        let k = self.unwrap_labeled(&KeyKind::Fernet.label(id), id, wrapped, kcv)?;
        Ok(crate::fernet::FernetKey::from_bytes(&k))
    }

    /// Unwraps key material bound to `label`; `id` names the key in errors.
    pub fn unwrap_labeled(
        &self,
        label: &str,
        id: &str,
        wrapped: &[u8],
        kcv: &[u8],
    ) -> Result<Zeroizing<[u8; KEY_LEN]>> {
        if kcv != self.check_value() {
            return Err(EkmError::MasterKeyMismatch {
                key_id: id.to_string(),
                expected: fingerprint_of(kcv),
                configured: self.fingerprint(),
            });
        }
        if wrapped.len() != WRAPPED_LEN {
            return Err(EkmError::WrappedKeyCorrupt(id.to_string()));
        }
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        k.copy_from_slice(&wrapped[NONCE_LEN..NONCE_LEN + KEY_LEN]);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&wrapped[..NONCE_LEN]);
        let tag = Tag::try_from(&wrapped[NONCE_LEN + KEY_LEN..])
            .map_err(|_| EkmError::WrappedKeyCorrupt(id.to_string()))?;
        self.cipher()
            .decrypt_inout_detached(
                &Nonce::from(nonce),
                label.as_bytes(),
                (&mut k[..]).into(),
                &tag,
            )
            .map_err(|_| EkmError::WrappedKeyCorrupt(id.to_string()))?;
        Ok(k)
    }
}

/// What a key is: an ekm data key (AES-256-GCM, `ekm1:` values), or a
/// Fernet key imported from the runbook's key store (decrypt only). The kind
/// is part of what the master key's wrap authenticates, so material of one
/// kind never unwraps as the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Ekm,
    Fernet,
}

impl KeyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Ekm => "ekm",
            KeyKind::Fernet => "fernet",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "ekm" => Ok(KeyKind::Ekm),
            "fernet" => Ok(KeyKind::Fernet),
            other => Err(EkmError::Internal(format!("unknown key kind {other}"))),
        }
    }

    /// The associated data of the key's wrap (ekm keys keep 0.1.0's).
    pub fn label(self, id: &str) -> String {
        match self {
            KeyKind::Ekm => format!("ekm-dek-v1:{id}"),
            KeyKind::Fernet => format!("ekm-fernet-v1:{id}"),
        }
    }
}

/// A fresh data key from the OS random source, returned wrapped (for the
/// table) and unwrapped (for use).
pub fn new_data_key(master: &MasterKey, id: &KeyId) -> Result<(Vec<u8>, DataKey)> {
    let mut dek = Zeroizing::new([0u8; KEY_LEN]);
    os_random(&mut dek[..])?;
    let wrapped = master.wrap(id, &dek)?;
    Ok((wrapped, DataKey::new(*id, &dek)))
}
