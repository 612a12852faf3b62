//! ekm's AES-256-GCM adapter (ekm_core::gcm, over RustCrypto aes-gcm)
//! against the NIST test vectors and, for random keys, nonces, associated
//! data and lengths, against an independent implementation (ring).
use aes_gcm::aead::{AeadInOut, KeyInit};
use ekm_core::gcm::{Gcm, Unauthentic};
use proptest::prelude::*;

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

fn check_vector(k: &str, iv: &str, p: &str, a: &str, c: &str, t: &str) {
    let key: [u8; 32] = unhex(k).try_into().unwrap();
    let nonce: [u8; 12] = unhex(iv).try_into().unwrap();
    let (pt, aad) = (unhex(p), unhex(a));
    let g = Gcm::new(&key);
    let mut buf = pt.clone();
    let tag = g.seal_in_place(&nonce, &aad, &mut buf).unwrap();
    assert_eq!(hex::encode(&buf), c);
    assert_eq!(hex::encode(tag), t);
    g.open_in_place(&nonce, &aad, &mut buf, &tag).unwrap();
    assert_eq!(buf, pt);
}

/// The AES-256 cases (13-16) of McGrew & Viega, "The Galois/Counter Mode of
/// Operation", as used by NIST's GCM test vectors.
#[test]
fn nist_vectors() {
    let z = "0000000000000000000000000000000000000000000000000000000000000000";
    check_vector(
        z,
        "000000000000000000000000",
        "",
        "",
        "",
        "530f8afbc74536b9a963b4f1c4cb738b",
    );
    check_vector(
        z,
        "000000000000000000000000",
        "00000000000000000000000000000000",
        "",
        "cea7403d4d606b6e074ec5d3baf39d18",
        "d0d1c8a799996bf0265b98b5d48ab919",
    );
    let k = "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308";
    check_vector(
        k,
        "cafebabefacedbaddecaf888",
        "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b1\
         6aedf5aa0de657ba637b391aafd255",
        "",
        "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f6\
         1e6393ba7a0abcc9f662898015ad",
        "b094dac5d93471bdec1a502270e3cc6c",
    );
    check_vector(
        k,
        "cafebabefacedbaddecaf888",
        "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b1\
         6aedf5aa0de657ba637b39",
        "feedfacedeadbeeffeedfacedeadbeefabaddad2",
        "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f6\
         1e6393ba7a0abcc9f662",
        "76fc6ece0f4e1768cddf8853bb2d551b",
    );
}

fn reference_seal(key: &[u8; 32], nonce: &[u8; 12], aad: &[u8], pt: &[u8]) -> (Vec<u8>, [u8; 16]) {
    let mut a = pt.to_vec();
    let tag = aes_gcm::Aes256Gcm::new(key.into())
        .encrypt_inout_detached(nonce.into(), aad, (&mut a[..]).into())
        .unwrap();
    let rk = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, key).unwrap(),
    );
    let mut r = pt.to_vec();
    let rtag = rk
        .seal_in_place_separate_tag(
            ring::aead::Nonce::assume_unique_for_key(*nonce),
            ring::aead::Aad::from(aad),
            &mut r,
        )
        .unwrap();
    assert_eq!(a, r, "the two references agree");
    assert_eq!(&tag[..], rtag.as_ref());
    (a, tag.into())
}

/// Every partial-block length of the data and the associated data (the
/// tails are assembled in registers from overlapping loads and stores),
/// inside a larger buffer whose bytes around the value must stay untouched.
#[test]
fn every_short_length_matches_the_references() {
    let key = [7u8; 32];
    let nonce = [9u8; 12];
    let g = Gcm::new(&key);
    for aad_len in 0..=33usize {
        let aad: Vec<u8> = (0..aad_len).map(|i| (i * 31 + 5) as u8).collect();
        for pt_len in 0..=49usize {
            let pt: Vec<u8> = (0..pt_len).map(|i| (i * 17 + 3) as u8).collect();
            let mut padded = vec![0xA5u8; pt_len + 32];
            padded[16..16 + pt_len].copy_from_slice(&pt);
            let tag = g
                .seal_in_place(&nonce, &aad[..], &mut padded[16..16 + pt_len])
                .unwrap();
            let (ct, rtag) = reference_seal(&key, &nonce, &aad, &pt);
            assert_eq!(
                &padded[16..16 + pt_len],
                &ct[..],
                "aad {aad_len}, data {pt_len}"
            );
            assert_eq!(tag, rtag, "aad {aad_len}, data {pt_len}");
            g.open_in_place(&nonce, &aad, &mut padded[16..16 + pt_len], &tag)
                .unwrap();
            assert_eq!(&padded[16..16 + pt_len], &pt[..]);
            assert!(
                padded[..16]
                    .iter()
                    .chain(&padded[16 + pt_len..])
                    .all(|&b| b == 0xA5),
                "bytes around the value changed"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn matches_aes_gcm_and_ring(
        key in any::<[u8; 32]>(),
        nonce in any::<[u8; 12]>(),
        aad in proptest::collection::vec(any::<u8>(), 0..100),
        pt in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let g = Gcm::new(&key);
        let mut buf = pt.clone();
        let tag = g.seal_in_place(&nonce, &aad, &mut buf).unwrap();
        let (ct, rtag) = reference_seal(&key, &nonce, &aad, &pt);
        prop_assert_eq!(&buf, &ct);
        prop_assert_eq!(tag, rtag);
        g.open_in_place(&nonce, &aad, &mut buf, &tag).unwrap();
        prop_assert_eq!(&buf, &pt);
    }

    /// The one-pass re-encryption equals opening under the old key and
    /// sealing under the new one, and leaves a value that fails to
    /// authenticate untouched.
    #[test]
    fn reseal_equals_open_then_seal(
        k1 in any::<[u8; 32]>(),
        k2 in any::<[u8; 32]>(),
        n1 in any::<[u8; 12]>(),
        n2 in any::<[u8; 12]>(),
        aad1 in proptest::collection::vec(any::<u8>(), 0..70),
        aad2 in proptest::collection::vec(any::<u8>(), 0..70),
        pt in proptest::collection::vec(any::<u8>(), 0..300),
        flip in any::<Option<(usize, u8)>>(),
    ) {
        let (old, new) = (Gcm::new(&k1), Gcm::new(&k2));
        let mut ct = pt.clone();
        let mut tag = old.seal_in_place(&n1, &aad1, &mut ct).unwrap();
        if let Some((pos, bit)) = flip {
            tag[pos % 16] ^= 1 << (bit % 8);
            let mut buf = ct.clone();
            prop_assert_eq!(new.reseal_in_place(&old, &n1, &aad1, &tag, &n2, &aad2, &mut buf), Err(Unauthentic));
            prop_assert_eq!(&buf, &ct);
        } else {
            let mut buf = ct.clone();
            let t2 = new.reseal_in_place(&old, &n1, &aad1, &tag, &n2, &aad2, &mut buf).unwrap();
            let mut expect = pt.clone();
            let et = new.seal_in_place(&n2, &aad2, &mut expect).unwrap();
            prop_assert_eq!(&buf, &expect);
            prop_assert_eq!(t2, et);
        }
    }

    #[test]
    fn any_change_fails_authentication(
        key in any::<[u8; 32]>(),
        aad in proptest::collection::vec(any::<u8>(), 0..40),
        pt in proptest::collection::vec(any::<u8>(), 1..80),
        which in 0usize..4,
        pos in any::<usize>(),
        bit in 0u8..8,
    ) {
        let g = Gcm::new(&key);
        let nonce = [5u8; 12];
        let mut ct = pt.clone();
        let mut tag = g.seal_in_place(&nonce, &aad, &mut ct).unwrap();
        let mut aad2 = aad.clone();
        let mut nonce2 = nonce;
        match which {
            0 => { let i = pos % ct.len(); ct[i] ^= 1 << bit; }
            1 => { let i = pos % 16; tag[i] ^= 1 << bit; }
            2 => { if aad2.is_empty() { aad2.push(0) } else { let i = pos % aad2.len(); aad2[i] ^= 1 << bit; } }
            _ => { let i = pos % 12; nonce2[i] ^= 1 << bit; }
        }
        let before = ct.clone();
        prop_assert_eq!(g.open_in_place(&nonce2, &aad2, &mut ct, &tag), Err(Unauthentic));
        prop_assert_eq!(ct, before, "nothing is decrypted when the tag does not verify");
    }
}

#[test]
fn long_values_match() {
    let key = [0x24u8; 32];
    let nonce = [3u8; 12];
    let g = Gcm::new(&key);
    for n in [1000usize, 4096, 65_537, 1_000_003] {
        let pt: Vec<u8> = (0..n).map(|i| (i * 7 % 256) as u8).collect();
        let mut buf = pt.clone();
        let tag = g.seal_in_place(&nonce, b"ctx", &mut buf).unwrap();
        let (ct, rtag) = reference_seal(&key, &nonce, b"ctx", &pt);
        assert_eq!(buf, ct);
        assert_eq!(tag, rtag);
    }
}
