//! AES-256-GCM (NIST SP 800-38D, 96-bit nonces) for the short values ekm
//! encrypts once per row.
//!
//! Why not only a library: for a 25-byte value the general-purpose
//! implementations (ring, aes-gcm) spend most of their ~100 ns on setup that
//! pays off for long messages. Here, on x86_64 with AES-NI and PCLMULQDQ
//! enabled at compile time (`.cargo/config.toml`), the counter blocks and the
//! tag block go through AES in one interleaved pass and GHASH runs on
//! PCLMULQDQ with one reduction per four blocks. On other targets (or without
//! those features) the `aes-gcm` crate does the work, with the same API.
//!
//! Correctness is checked, not assumed: NIST test vectors and differential
//! property tests against both `aes-gcm` and `ring` for random keys, nonces,
//! associated data and lengths (tests/crypto.rs). The tag is verified in
//! constant time before anything is decrypted.

pub const KEY_LEN: usize = 32;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;

/// Authentication failed (wrong key, associated data, or altered value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unauthentic;

pub use imp::Gcm;

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "aes",
    target_feature = "pclmulqdq",
    target_feature = "sse4.1"
))]
mod imp {
    use super::{Unauthentic, KEY_LEN, NONCE_LEN, TAG_LEN};
    use std::arch::x86_64::*;

    /// An expanded AES-256-GCM key: 15 round keys and H, H^2, H^3, H^4
    /// (byte-reflected for GHASH). Wiped on drop.
    pub struct Gcm {
        rk: [__m128i; 15],
        h: [__m128i; 4],
    }

    #[inline(always)]
    unsafe fn bswap(x: __m128i) -> __m128i {
        unsafe {
            _mm_shuffle_epi8(
                x,
                _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            )
        }
    }

    #[inline(always)]
    unsafe fn assist1(t1: __m128i, t2: __m128i) -> __m128i {
        unsafe { _mm_xor_si128(prefix_xor(t1), _mm_shuffle_epi32(t2, 0xff)) }
    }

    #[inline(always)]
    unsafe fn assist2(t1: __m128i, t3: __m128i) -> __m128i {
        unsafe {
            let t2 = _mm_shuffle_epi32(_mm_aeskeygenassist_si128::<0>(t1), 0xaa);
            _mm_xor_si128(prefix_xor(t3), t2)
        }
    }

    /// x ^ (x << 32) ^ (x << 64) ^ (x << 96): each word of the previous round
    /// key XORed with the words before it (the AES key schedule's chain).
    #[inline(always)]
    unsafe fn prefix_xor(x: __m128i) -> __m128i {
        unsafe {
            let a = _mm_xor_si128(x, _mm_slli_si128(x, 4));
            _mm_xor_si128(a, _mm_slli_si128(a, 8))
        }
    }

    /// Carry-less 128x128 -> 256 product (lo, hi) of two byte-reflected values.
    #[inline(always)]
    unsafe fn clmul(a: __m128i, b: __m128i) -> (__m128i, __m128i) {
        unsafe {
            let lo = _mm_clmulepi64_si128(a, b, 0x00);
            let hi = _mm_clmulepi64_si128(a, b, 0x11);
            let mid = _mm_xor_si128(
                _mm_clmulepi64_si128(a, b, 0x10),
                _mm_clmulepi64_si128(a, b, 0x01),
            );
            (
                _mm_xor_si128(lo, _mm_slli_si128(mid, 8)),
                _mm_xor_si128(hi, _mm_srli_si128(mid, 8)),
            )
        }
    }

    /// Reduces a 256-bit product modulo the GCM polynomial (Intel's
    /// carry-less multiplication white paper, algorithm 5: shift left by one,
    /// then reduce).
    #[inline(always)]
    unsafe fn reduce(lo: __m128i, hi: __m128i) -> __m128i {
        unsafe {
            let t7 = _mm_srli_epi32(lo, 31);
            let t8 = _mm_srli_epi32(hi, 31);
            let mut t3 = _mm_slli_epi32(lo, 1);
            let mut t6 = _mm_slli_epi32(hi, 1);
            let t9 = _mm_srli_si128(t7, 12);
            let t8 = _mm_slli_si128(t8, 4);
            let t7 = _mm_slli_si128(t7, 4);
            t3 = _mm_or_si128(t3, t7);
            t6 = _mm_or_si128(t6, t8);
            t6 = _mm_or_si128(t6, t9);
            let a = _mm_slli_epi32(t3, 31);
            let b = _mm_slli_epi32(t3, 30);
            let c = _mm_slli_epi32(t3, 25);
            let mut t7 = _mm_xor_si128(_mm_xor_si128(a, b), c);
            let t8 = _mm_srli_si128(t7, 4);
            t7 = _mm_slli_si128(t7, 12);
            t3 = _mm_xor_si128(t3, t7);
            let mut t2 = _mm_srli_epi32(t3, 1);
            let t4 = _mm_srli_epi32(t3, 2);
            let t5 = _mm_srli_epi32(t3, 7);
            t2 = _mm_xor_si128(t2, t4);
            t2 = _mm_xor_si128(t2, t5);
            t2 = _mm_xor_si128(t2, t8);
            t3 = _mm_xor_si128(t3, t2);
            _mm_xor_si128(t6, t3)
        }
    }

    #[inline(always)]
    unsafe fn gfmul(a: __m128i, b: __m128i) -> __m128i {
        unsafe {
            let (lo, hi) = clmul(a, b);
            reduce(lo, hi)
        }
    }

    /// A 16-byte block of `data` from `at`, zero-padded (byte order as stored).
    #[inline(always)]
    unsafe fn load_padded(data: &[u8], at: usize) -> __m128i {
        unsafe {
            let rest = data.len() - at;
            if rest >= 16 {
                _mm_loadu_si128(data.as_ptr().add(at) as *const __m128i)
            } else {
                load_partial(data.as_ptr().add(at), rest)
            }
        }
    }

    /// `n` < 16 bytes from `p` as a zero-padded block, assembled in registers
    /// from at most two (overlapping) loads. Not through a stack buffer: a
    /// 16-byte load of bytes just written by narrower stores cannot be
    /// forwarded from the store buffer and stalls (it was a fifth of the
    /// time of sealing or opening a short value).
    #[inline(always)]
    unsafe fn load_partial(p: *const u8, n: usize) -> __m128i {
        unsafe {
            debug_assert!(n < 16);
            if n >= 8 {
                let lo = (p as *const u64).read_unaligned();
                // bytes 8..n are the top n-8 bytes of the 8 ending at n
                let hi = if n > 8 {
                    (p.add(n - 8) as *const u64).read_unaligned() >> ((16 - n) * 8)
                } else {
                    0
                };
                _mm_set_epi64x(hi as i64, lo as i64)
            } else if n >= 4 {
                let lo = (p as *const u32).read_unaligned() as u64;
                // bytes 4..n are the top n-4 bytes of the 4 ending at n
                let hi = ((p.add(n - 4) as *const u32).read_unaligned() as u64) >> ((8 - n) * 8);
                _mm_cvtsi64_si128((lo | (hi << 32)) as i64)
            } else if n > 0 {
                let v = (*p as u64)
                    | ((*p.add(n / 2) as u64) << (n / 2 * 8))
                    | ((*p.add(n - 1) as u64) << ((n - 1) * 8));
                _mm_cvtsi64_si128(v as i64)
            } else {
                _mm_setzero_si128()
            }
        }
    }

    /// Stores the first `n` < 16 bytes of `x` at `p` with at most two
    /// (overlapping) stores of 8, 4 or 1 bytes.
    #[inline(always)]
    unsafe fn store_partial(p: *mut u8, x: __m128i, n: usize) {
        unsafe {
            debug_assert!(n < 16);
            let lo = _mm_cvtsi128_si64(x) as u64;
            if n >= 8 {
                (p as *mut u64).write_unaligned(lo);
                if n > 8 {
                    let hi = _mm_extract_epi64(x, 1) as u64;
                    // bytes n-8..n: the top of lo and the bottom of hi
                    let tail = (lo >> ((n - 8) * 8)) | (hi << ((16 - n) * 8));
                    (p.add(n - 8) as *mut u64).write_unaligned(tail);
                }
            } else if n >= 4 {
                (p as *mut u32).write_unaligned(lo as u32);
                (p.add(n - 4) as *mut u32).write_unaligned((lo >> ((n - 4) * 8)) as u32);
            } else if n > 0 {
                *p = lo as u8;
                *p.add(n / 2) = (lo >> (n / 2 * 8)) as u8;
                *p.add(n - 1) = (lo >> ((n - 1) * 8)) as u8;
            }
        }
    }

    /// GHASH over a known number of blocks, four at a time with one
    /// reduction per group: Y' = (Y ^ B1)·H^k ^ B2·H^(k-1) ^ … ^ Bk·H for a
    /// group of k <= 4 blocks (the last group may be shorter).
    struct Ghash<'a> {
        h: &'a [__m128i; 4],
        y: __m128i,
        lo: __m128i,
        hi: __m128i,
        /// blocks added so far, and in all
        i: usize,
        total: usize,
    }

    impl<'a> Ghash<'a> {
        #[inline(always)]
        unsafe fn new(h: &'a [__m128i; 4], aad_len: usize, ct_len: usize) -> Self {
            unsafe {
                Ghash {
                    h,
                    y: _mm_setzero_si128(),
                    lo: _mm_setzero_si128(),
                    hi: _mm_setzero_si128(),
                    i: 0,
                    total: aad_len.div_ceil(16) + ct_len.div_ceil(16) + 1,
                }
            }
        }

        /// Adds one block (as stored: big-endian bytes).
        #[inline(always)]
        unsafe fn block(&mut self, b: __m128i) {
            unsafe {
                let pos = self.i % 4;
                let group = (self.total - (self.i - pos)).min(4);
                let mut x = bswap(b);
                if pos == 0 {
                    x = _mm_xor_si128(x, self.y);
                }
                let (l, h) = clmul(x, self.h[group - 1 - pos]);
                self.lo = _mm_xor_si128(self.lo, l);
                self.hi = _mm_xor_si128(self.hi, h);
                self.i += 1;
                if pos == group - 1 {
                    self.y = reduce(self.lo, self.hi);
                    self.lo = _mm_setzero_si128();
                    self.hi = _mm_setzero_si128();
                }
            }
        }

        #[inline(always)]
        unsafe fn data(&mut self, d: &[u8]) {
            unsafe {
                let mut at = 0;
                while at < d.len() {
                    self.block(load_padded(d, at));
                    at += 16;
                }
            }
        }

        /// The GHASH value (big-endian bytes) after the length block.
        #[inline(always)]
        unsafe fn finish(mut self, aad_len: usize, ct_len: usize) -> __m128i {
            unsafe {
                let lens = _mm_set_epi64x(
                    ((ct_len as u64) * 8).swap_bytes() as i64,
                    ((aad_len as u64) * 8).swap_bytes() as i64,
                );
                self.block(lens);
                debug_assert_eq!(self.i, self.total);
                bswap(self.y)
            }
        }
    }

    impl Gcm {
        pub fn new(key: &[u8; KEY_LEN]) -> Self {
            unsafe {
                let mut rk = [_mm_setzero_si128(); 15];
                let mut t1 = _mm_loadu_si128(key.as_ptr() as *const __m128i);
                let mut t3 = _mm_loadu_si128(key.as_ptr().add(16) as *const __m128i);
                rk[0] = t1;
                rk[1] = t3;
                macro_rules! round {
                    ($i:expr, $rcon:expr) => {
                        t1 = assist1(t1, _mm_aeskeygenassist_si128::<$rcon>(t3));
                        rk[$i] = t1;
                        t3 = assist2(t1, t3);
                        rk[$i + 1] = t3;
                    };
                }
                round!(2, 0x01);
                round!(4, 0x02);
                round!(6, 0x04);
                round!(8, 0x08);
                round!(10, 0x10);
                round!(12, 0x20);
                rk[14] = assist1(t1, _mm_aeskeygenassist_si128::<0x40>(t3));
                let mut g = Gcm {
                    rk,
                    h: [_mm_setzero_si128(); 4],
                };
                let h = bswap(g.encrypt1(_mm_setzero_si128()));
                let h2 = gfmul(h, h);
                let h3 = gfmul(h2, h);
                let h4 = gfmul(h3, h);
                g.h = [h, h2, h3, h4];
                g
            }
        }

        #[inline(always)]
        unsafe fn encrypt1(&self, b: __m128i) -> __m128i {
            unsafe {
                let mut x = _mm_xor_si128(b, self.rk[0]);
                for r in &self.rk[1..14] {
                    x = _mm_aesenc_si128(x, *r);
                }
                _mm_aesenclast_si128(x, self.rk[14])
            }
        }

        /// Encrypts four blocks at once (the AES rounds interleave).
        #[inline(always)]
        unsafe fn encrypt4(&self, b: [__m128i; 4]) -> [__m128i; 4] {
            unsafe {
                let k0 = self.rk[0];
                let mut x = [
                    _mm_xor_si128(b[0], k0),
                    _mm_xor_si128(b[1], k0),
                    _mm_xor_si128(b[2], k0),
                    _mm_xor_si128(b[3], k0),
                ];
                for r in &self.rk[1..14] {
                    x[0] = _mm_aesenc_si128(x[0], *r);
                    x[1] = _mm_aesenc_si128(x[1], *r);
                    x[2] = _mm_aesenc_si128(x[2], *r);
                    x[3] = _mm_aesenc_si128(x[3], *r);
                }
                let l = self.rk[14];
                [
                    _mm_aesenclast_si128(x[0], l),
                    _mm_aesenclast_si128(x[1], l),
                    _mm_aesenclast_si128(x[2], l),
                    _mm_aesenclast_si128(x[3], l),
                ]
            }
        }

        /// The counter blocks `nonce || 1` (for the tag) to `nonce || 4`,
        /// encrypted in one interleaved pass, and the base block.
        #[inline(always)]
        unsafe fn first_blocks(&self, nonce: &[u8; NONCE_LEN]) -> ([__m128i; 4], __m128i) {
            unsafe {
                let base = load_nonce(nonce);
                (self.encrypt4(counters(base, 1)), base)
            }
        }

        /// Four blocks under each of two keys, all eight interleaved.
        #[inline(always)]
        unsafe fn encrypt4x2(
            a: &Gcm,
            xa: [__m128i; 4],
            b: &Gcm,
            xb: [__m128i; 4],
        ) -> ([__m128i; 4], [__m128i; 4]) {
            unsafe {
                let mut x = xa.map(|v| _mm_xor_si128(v, a.rk[0]));
                let mut y = xb.map(|v| _mm_xor_si128(v, b.rk[0]));
                for r in 1..14 {
                    let (ka, kb) = (a.rk[r], b.rk[r]);
                    x = x.map(|v| _mm_aesenc_si128(v, ka));
                    y = y.map(|v| _mm_aesenc_si128(v, kb));
                }
                let (la, lb) = (a.rk[14], b.rk[14]);
                (
                    x.map(|v| _mm_aesenclast_si128(v, la)),
                    y.map(|v| _mm_aesenclast_si128(v, lb)),
                )
            }
        }

        /// Re-encrypts `buf`, a ciphertext under `old` with `old_nonce` and
        /// `old_aad`, under this key with `nonce` and `aad`, in place, and
        /// returns the new tag. `old_tag` is verified (in constant time)
        /// first; on failure `buf` is untouched. The plaintext is never
        /// formed: each block is XORed with both keystreams at once, and the
        /// two keys' counter blocks go through AES in one interleaved pass.
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
            unsafe {
                let (ob, nb) = (load_nonce(old_nonce), load_nonce(nonce));
                let (of, nf) = Self::encrypt4x2(old, counters(ob, 1), self, counters(nb, 1));
                let mut g = Ghash::new(&old.h, old_aad.len(), buf.len());
                g.data(old_aad);
                g.data(buf);
                let expect = _mm_xor_si128(g.finish(old_aad.len(), buf.len()), of[0]);
                let got = _mm_loadu_si128(old_tag.as_ptr() as *const __m128i);
                if _mm_movemask_epi8(_mm_cmpeq_epi8(expect, got)) != 0xffff {
                    return Err(Unauthentic);
                }
                let mut at = 0usize;
                for i in 1..4 {
                    if at >= buf.len() {
                        break;
                    }
                    xor_block(buf, at, _mm_xor_si128(of[i], nf[i]));
                    at += 16;
                }
                let mut next = 5u32;
                while at < buf.len() {
                    let (ko, kn) =
                        Self::encrypt4x2(old, counters(ob, next), self, counters(nb, next));
                    next += 4;
                    for i in 0..4 {
                        if at >= buf.len() {
                            break;
                        }
                        xor_block(buf, at, _mm_xor_si128(ko[i], kn[i]));
                        at += 16;
                    }
                }
                let mut g = Ghash::new(&self.h, aad.len(), buf.len());
                g.data(aad);
                g.data(buf);
                let s = g.finish(aad.len(), buf.len());
                let mut tag = [0u8; TAG_LEN];
                _mm_storeu_si128(tag.as_mut_ptr() as *mut __m128i, _mm_xor_si128(s, nf[0]));
                Ok(tag)
            }
        }

        /// XORs `buf` with the keystream from `nonce || 2` on; `first` holds
        /// the encrypted blocks 1..4 (block 1 is the tag's).
        #[inline(always)]
        unsafe fn ctr(&self, first: &[__m128i; 4], base: __m128i, buf: &mut [u8]) {
            unsafe {
                let mut at = 0usize;
                for k in &first[1..] {
                    if at >= buf.len() {
                        return;
                    }
                    xor_block(buf, at, *k);
                    at += 16;
                }
                let mut next = 5u32;
                while at < buf.len() {
                    let ks = self.encrypt4(counters(base, next));
                    next += 4;
                    for k in ks {
                        if at >= buf.len() {
                            return;
                        }
                        xor_block(buf, at, k);
                        at += 16;
                    }
                }
            }
        }

        pub fn seal_in_place(
            &self,
            nonce: &[u8; NONCE_LEN],
            aad: &[u8],
            buf: &mut [u8],
        ) -> [u8; TAG_LEN] {
            unsafe {
                let (first, base) = self.first_blocks(nonce);
                self.ctr(&first, base, buf);
                let mut g = Ghash::new(&self.h, aad.len(), buf.len());
                g.data(aad);
                g.data(buf);
                let s = g.finish(aad.len(), buf.len());
                let mut tag = [0u8; TAG_LEN];
                _mm_storeu_si128(tag.as_mut_ptr() as *mut __m128i, _mm_xor_si128(s, first[0]));
                tag
            }
        }

        /// Verifies `tag` (in constant time) and only then decrypts `buf`.
        pub fn open_in_place(
            &self,
            nonce: &[u8; NONCE_LEN],
            aad: &[u8],
            buf: &mut [u8],
            tag: &[u8; TAG_LEN],
        ) -> Result<(), Unauthentic> {
            unsafe {
                let (first, base) = self.first_blocks(nonce);
                let mut g = Ghash::new(&self.h, aad.len(), buf.len());
                g.data(aad);
                g.data(buf);
                let s = g.finish(aad.len(), buf.len());
                let expect = _mm_xor_si128(s, first[0]);
                let got = _mm_loadu_si128(tag.as_ptr() as *const __m128i);
                if _mm_movemask_epi8(_mm_cmpeq_epi8(expect, got)) != 0xffff {
                    return Err(Unauthentic);
                }
                self.ctr(&first, base, buf);
                Ok(())
            }
        }
    }

    /// Counter block `i` (big-endian in the last four bytes) after `base`'s nonce.
    #[inline(always)]
    unsafe fn counter(base: __m128i, i: u32) -> __m128i {
        unsafe { _mm_insert_epi32(base, i.swap_bytes() as i32, 3) }
    }

    /// Counter blocks `i` to `i + 3`.
    #[inline(always)]
    unsafe fn counters(base: __m128i, i: u32) -> [__m128i; 4] {
        unsafe {
            [
                counter(base, i),
                counter(base, i + 1),
                counter(base, i + 2),
                counter(base, i + 3),
            ]
        }
    }

    /// The nonce as a counter block with a zero counter, read as 8 + 4
    /// bytes, the shape in which a 12-byte array is copied (a load
    /// straddling those two stores would stall).
    #[inline(always)]
    unsafe fn load_nonce(nonce: &[u8; NONCE_LEN]) -> __m128i {
        unsafe {
            let p = nonce.as_ptr();
            _mm_set_epi64x(
                (p.add(8) as *const u32).read_unaligned() as i64,
                (p as *const u64).read_unaligned() as i64,
            )
        }
    }

    #[inline(always)]
    unsafe fn xor_block(buf: &mut [u8], at: usize, k: __m128i) {
        unsafe {
            let rest = buf.len() - at;
            let p = buf.as_mut_ptr().add(at);
            if rest >= 16 {
                let p = p as *mut __m128i;
                _mm_storeu_si128(p, _mm_xor_si128(_mm_loadu_si128(p), k));
            } else {
                store_partial(p, _mm_xor_si128(load_partial(p, rest), k), rest);
            }
        }
    }

    impl Drop for Gcm {
        fn drop(&mut self) {
            unsafe {
                let p = self as *mut Gcm as *mut u8;
                for i in 0..std::mem::size_of::<Gcm>() {
                    std::ptr::write_volatile(p.add(i), 0);
                }
            }
            std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
        }
    }
}

#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "aes",
    target_feature = "pclmulqdq",
    target_feature = "sse4.1"
)))]
mod imp {
    use super::{Unauthentic, KEY_LEN, NONCE_LEN, TAG_LEN};
    use aes_gcm::aead::{AeadInOut, KeyInit};

    /// The `aes-gcm` crate (zeroizes its key schedule on drop).
    pub struct Gcm(aes_gcm::Aes256Gcm);

    impl Gcm {
        pub fn new(key: &[u8; KEY_LEN]) -> Self {
            Gcm(aes_gcm::Aes256Gcm::new(key.into()))
        }

        pub fn seal_in_place(
            &self,
            nonce: &[u8; NONCE_LEN],
            aad: &[u8],
            buf: &mut [u8],
        ) -> [u8; TAG_LEN] {
            self.0
                .encrypt_inout_detached(nonce.into(), aad, buf.into())
                .expect("value shorter than the GCM limit")
                .into()
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
            Ok(self.seal_in_place(nonce, aad, buf))
        }
    }
}
