use chrono::{TimeZone, Utc};
use ekm_core::crypto::{new_data_key, KeyKind, KCV_LEN};
use ekm_core::format::{self, encoded_len};
use ekm_core::{EkmError, KeyId, MasterKey};
use proptest::prelude::*;

fn key_id(s: u16) -> KeyId {
    KeyId::new(Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0).unwrap(), s).unwrap()
}

fn setup() -> (MasterKey, ekm_core::DataKey) {
    let m = MasterKey::generate().unwrap();
    let (_, dk) = new_data_key(&m, &key_id(0xabcd)).unwrap();
    (m, dk)
}

#[test]
fn round_trip_sizes_and_contexts() {
    let (_, k) = setup();
    for (pt, ctx) in [
        (&b""[..], &b""[..]),
        (b"alice@example.com", b"public.people.email"),
        (b"+919876543210", b""),
        ("ünïcødé ✓".as_bytes(), b"x"),
    ] {
        let ct = k.seal(&[7u8; 12], pt, ctx).unwrap();
        assert!(ct.starts_with("ekm1:"));
        assert!(ct[5..]
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        assert_eq!(ct.len(), encoded_len(pt.len()));
        assert_eq!(&k.open(&ct, ctx).unwrap()[..], pt);
        assert_eq!(format::key_of(&ct).unwrap(), k.id());
    }
    // a multi-megabyte value
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let ct = k.seal(&[1u8; 12], &big, b"").unwrap();
    assert_eq!(&k.open(&ct, b"").unwrap()[..], &big[..]);
}

#[test]
fn compact_against_fernet() {
    let (_, k) = setup();
    let ct = k
        .seal(&[0u8; 12], b"alice.smith@example.co.uk", b"")
        .unwrap();
    assert_eq!(ct.len(), 85);
    assert!(ct.len() * 100 <= 156 * 60);
}

#[test]
fn wrong_context_and_tampering_fail_cleanly() {
    let (_, k) = setup();
    let ct = k
        .seal(&[3u8; 12], b"secret", b"public.people.email")
        .unwrap();
    assert!(matches!(
        k.open(&ct, b"public.people.mobno"),
        Err(EkmError::AuthenticationFailed(_))
    ));
    assert!(matches!(
        k.open(&ct, b""),
        Err(EkmError::AuthenticationFailed(_))
    ));
    // flip each body character in turn (except the key reference, which names another key)
    let bytes = ct.as_bytes();
    for i in 5 + 12..bytes.len() {
        let mut t = bytes.to_vec();
        t[i] = if t[i] == b'A' { b'B' } else { b'A' };
        let t = String::from_utf8(t).unwrap();
        let r = k.open(&t, b"public.people.email");
        assert!(
            matches!(
                r,
                Err(EkmError::AuthenticationFailed(_)) | Err(EkmError::Malformed(_))
            ),
            "{i}: {r:?}"
        );
    }
    // truncation
    for cut in [ct.len() - 1, ct.len() - 5, 40, 6, 5] {
        let r = k.open(&ct[..cut], b"public.people.email");
        assert!(r.is_err(), "cut {cut}");
    }
}

#[test]
fn errors_never_carry_plaintext_or_key_bytes() {
    let (m, k) = setup();
    let ct = k.seal(&[3u8; 12], b"TOPSECRETVALUE", b"ctx").unwrap();
    let e = k.open(&ct, b"other").unwrap_err();
    let msg = format!("{e} {:?} {}", e, e.hint().unwrap_or_default());
    assert!(!msg.contains("TOPSECRETVALUE"));
    assert!(!msg.contains(&*m.to_hex()));
    assert_eq!(format!("{m:?}"), "MasterKey(<redacted>)");
}

#[test]
fn wrap_unwrap_and_master_key_mismatch() {
    let m = MasterKey::generate().unwrap();
    let id = key_id(1);
    let (wrapped, dk) = new_data_key(&m, &id).unwrap();
    let kcv = m.check_value();
    assert_eq!(kcv.len(), KCV_LEN);
    let dk2 = m.unwrap(&id, &wrapped, &kcv).unwrap();
    let ct = dk.seal(&[9u8; 12], b"v", b"").unwrap();
    assert_eq!(&dk2.open(&ct, b"").unwrap()[..], b"v");
    // bound to the key id
    assert!(matches!(
        m.unwrap(&key_id(2), &wrapped, &kcv),
        Err(EkmError::WrappedKeyCorrupt(_))
    ));
    // another master key: named as a mismatch, never garbage
    let other = MasterKey::generate().unwrap();
    match other.unwrap(&id, &wrapped, &kcv) {
        Err(EkmError::MasterKeyMismatch {
            key_id,
            expected,
            configured,
        }) => {
            assert_eq!(key_id, id.to_string());
            assert_eq!(expected, m.fingerprint());
            assert_eq!(configured, other.fingerprint());
        }
        _ => panic!("a mismatch, naming both fingerprints"),
    }
    assert_eq!(m.fingerprint().len(), 2 * KCV_LEN);
    assert_ne!(m.fingerprint(), other.fingerprint());
    // re-wrapped under the other master key: the same data key
    let (rewrapped, new_kcv) = m
        .rewrap(&other, KeyKind::Ekm, &id.to_string(), &wrapped, &kcv)
        .unwrap();
    assert_eq!(new_kcv, other.check_value());
    assert_ne!(rewrapped, wrapped);
    let dk3 = other.unwrap(&id, &rewrapped, &new_kcv).unwrap();
    assert_eq!(&dk3.open(&ct, b"").unwrap()[..], b"v");
    assert!(matches!(
        m.unwrap(&id, &rewrapped, &new_kcv),
        Err(EkmError::MasterKeyMismatch { .. })
    ));
    assert!(matches!(
        other.rewrap(&m, KeyKind::Ekm, &id.to_string(), &wrapped, &kcv),
        Err(EkmError::MasterKeyMismatch { .. })
    ));
    // the kind is bound into the wrap: ekm material never unwraps as a
    // Fernet key of the same id, nor the other way round
    assert!(matches!(
        m.unwrap_fernet(&id.to_string(), &wrapped, &kcv),
        Err(EkmError::WrappedKeyCorrupt(_))
    ));
    let fw = m
        .wrap_labeled(&KeyKind::Fernet.label(&id.to_string()), &[9; 32])
        .unwrap();
    assert!(m.unwrap_fernet(&id.to_string(), &fw, &kcv).is_ok());
    assert!(matches!(
        m.unwrap(&id, &fw, &kcv),
        Err(EkmError::WrappedKeyCorrupt(_))
    ));
    // corrupted material
    let mut bad = wrapped.clone();
    bad[20] ^= 1;
    assert!(matches!(
        m.unwrap(&id, &bad, &kcv),
        Err(EkmError::WrappedKeyCorrupt(_))
    ));
    assert!(matches!(
        m.unwrap(&id, &wrapped[..10], &kcv),
        Err(EkmError::WrappedKeyCorrupt(_))
    ));
}

#[test]
fn master_key_parsing() {
    let hex64 = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n";
    let a = MasterKey::parse(hex64.as_bytes(), "file").unwrap();
    let b64 = "ABEiM0RVZneImaq7zN3u/wARIjNEVWZ3iJmqu8zd7v8=";
    let b = MasterKey::parse(b64.as_bytes(), "cmd").unwrap();
    assert_eq!(a.check_value(), b.check_value());
    for bad in [
        "",
        "short",
        &hex64[..63],
        "zz112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
    ] {
        let e = MasterKey::parse(bad.as_bytes(), "ekm.master_key_file").unwrap_err();
        assert_eq!(e, EkmError::MasterKeyInvalid("ekm.master_key_file".into()));
    }
}

#[test]
fn key_of_names_the_key() {
    let (_, k) = setup();
    let ct = k.seal(&[0u8; 12], b"x", b"").unwrap();
    assert_eq!(
        format::key_of(&ct).unwrap().to_string(),
        "key_20261128_120000_abcd"
    );
    assert_eq!(format::key_of("nope"), Err(EkmError::NotCiphertext));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// The parser never panics, and anything it accepts without the right key fails cleanly.
    #[test]
    fn parser_total(s in "\\PC{0,200}") {
        let _ = format::decoded_len(&s);
        let _ = format::key_of(&s);
        let _ = format::looks_encrypted(&s);
        let _ = KeyId::parse(&s);
    }

    #[test]
    fn parser_total_on_ekm_like_input(body in "[A-Za-z0-9_=+/-]{0,120}") {
        let (_, k) = setup();
        let s = format!("ekm1:{body}");
        let _ = format::key_of(&s);
        if let Ok(n) = format::decoded_len(&s) {
            let mut buf = vec![0u8; n];
            // no key made it: it must fail, with one of the data errors
            let r = k.open_in(&s, b"", &mut buf);
            let code = r.as_ref().err().map(|e| e.sqlstate());
            prop_assert!(matches!(code, Some("22P02" | "22P03" | "XX001" | "0A000" | "42704")), "{:?}", r);
        }
    }

    #[test]
    fn round_trip_any(pt in proptest::collection::vec(any::<u8>(), 0..300), ctx in proptest::collection::vec(any::<u8>(), 0..40), nonce in any::<[u8; 12]>()) {
        let (_, k) = setup();
        let ct = k.seal(&nonce, &pt, &ctx).unwrap();
        prop_assert_eq!(&k.open(&ct, &ctx).unwrap()[..], &pt[..]);
    }
}

/// The data-value cipher (ring) and the reference AES-256-GCM (aes-gcm)
/// agree byte for byte, so the choice of implementation is invisible in
/// stored ciphertexts.
#[test]
fn data_cipher_matches_reference_aes_gcm() {
    use aes_gcm::aead::{AeadInOut, KeyInit};
    let key = [0x42u8; 32];
    let id = key_id(0x0102);
    let dk = ekm_core::DataKey::new(id, &key);
    let reference = aes_gcm::Aes256Gcm::new(&key.into());
    // every context length across the associated data's 16-byte blocks and
    // its stack/heap boundary (contexts of 53 bytes and more)
    let long_ctx: Vec<u8> = (0..70u8).map(|i| b'a' + i % 26).collect();
    let mut cases: Vec<(&[u8], &[u8])> = vec![
        (&b""[..], &b""[..]),
        (b"alice@example.com", b"public.people.email"),
        (&[7u8; 300][..], b"x"),
    ];
    for n in 0..=long_ctx.len() {
        cases.push((b"+910000000001", &long_ctx[..n]));
    }
    for (pt, ctx) in cases {
        let nonce = [9u8; 12];
        let ct = dk.seal(&nonce, pt, ctx).unwrap();
        let mut bin = vec![0u8; format::decoded_len(&ct).unwrap()];
        format::decode_into(&ct, &mut bin).unwrap();
        let mut aad = b"ekm1".to_vec();
        aad.extend_from_slice(&id.to_ref());
        aad.extend_from_slice(ctx);
        let mut body = pt.to_vec();
        let tag = reference
            .encrypt_inout_detached(&nonce.into(), &aad, (&mut body[..]).into())
            .unwrap();
        assert_eq!(&bin[19..19 + pt.len()], &body[..]);
        assert_eq!(&bin[19 + pt.len()..], &tag[..]);
        assert_eq!(dk.open(&ct, ctx).unwrap().as_slice(), pt);
    }
}

proptest! {
    /// The SIMD and scalar base64url decoders agree with the base64 crate
    /// on valid input of every length and on input with stray characters.
    #[test]
    fn b64_decode_matches_base64_crate(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        use base64::Engine;
        let enc = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes);
        let mut out = vec![0u8; bytes.len() + 3];
        let n = format::b64_decode(enc.as_bytes(), &mut out).unwrap();
        prop_assert_eq!(&out[..n], &bytes[..]);
    }

    /// The SIMD and scalar base64url encoders agree with the base64 crate
    /// on every length (the SIMD path takes 12-byte blocks while 16 bytes
    /// remain), writing nothing past the encoded length.
    #[test]
    fn b64_encode_matches_base64_crate(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        use base64::Engine;
        let reference = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes);
        let mut out = vec![b'!'; reference.len() + 8];
        let n = format::b64_encode(&bytes, &mut out);
        prop_assert_eq!(n, reference.len());
        prop_assert_eq!(&out[..n], reference.as_bytes());
        prop_assert!(out[n..].iter().all(|&c| c == b'!'));
    }

    #[test]
    fn b64_decode_rejects_what_base64_crate_rejects(
        s in "[A-Za-z0-9_-]{0,90}",
        pos in any::<usize>(),
        c in any::<u8>(),
    ) {
        use base64::Engine;
        let mut v = s.into_bytes();
        if !v.is_empty() {
            let i = pos % v.len();
            v[i] = c;
        }
        let theirs = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&v);
        let mut out = vec![0u8; v.len()];
        let ours = format::b64_decode(&v, &mut out);
        prop_assert_eq!(ours.is_ok(), theirs.is_ok(), "input {:?}", String::from_utf8_lossy(&v));
        if let (Ok(n), Ok(t)) = (ours, theirs) {
            prop_assert_eq!(&out[..n], &t[..]);
        }
    }
}

/// `reseal` (the rotation's per-value step) against the two-step reference:
/// open with the old key, seal with the new one.
fn reseal_text(
    old: &ekm_core::DataKey,
    new: &ekm_core::DataKey,
    ct: &str,
    ctx: &[u8],
    nonce: &[u8; 12],
) -> ekm_core::Result<String> {
    let mut bin = vec![0u8; format::decoded_len(ct)?];
    let n = format::decode_into(ct, &mut bin)?;
    let mut out = vec![0u8; ct.len()];
    new.reseal(old, &mut bin[..n], ctx, nonce, &mut out)?;
    Ok(String::from_utf8(out).unwrap())
}

#[test]
fn reseal_moves_a_value_to_the_new_key() {
    let m = MasterKey::generate().unwrap();
    let (_, old) = new_data_key(&m, &key_id(1)).unwrap();
    let (_, new) = new_data_key(&m, &key_id(2)).unwrap();
    let big: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();
    for (pt, ctx) in [
        (&b""[..], &b""[..]),
        (b"alice@example.com", b"public.people.email"),
        (&big[..], b"t.c"),
        (&[0u8; 60][..], &[b'c'; 80][..]), // context longer than the stack AAD
    ] {
        let ct = old.seal(&[3u8; 12], pt, ctx).unwrap();
        let moved = reseal_text(&old, &new, &ct, ctx, &[9u8; 12]).unwrap();
        assert_eq!(moved, new.seal(&[9u8; 12], pt, ctx).unwrap());
        assert_eq!(format::key_of(&moved).unwrap(), new.id());
        assert_eq!(&new.open(&moved, ctx).unwrap()[..], pt);
        assert!(old.open(&moved, ctx).is_err());
    }
}

#[test]
fn reseal_refuses_what_does_not_open() {
    let m = MasterKey::generate().unwrap();
    let (_, old) = new_data_key(&m, &key_id(1)).unwrap();
    let (_, new) = new_data_key(&m, &key_id(2)).unwrap();
    let ct = old.seal(&[3u8; 12], b"secret value", b"a").unwrap();
    // wrong context
    assert!(matches!(
        reseal_text(&old, &new, &ct, b"b", &[9u8; 12]),
        Err(EkmError::AuthenticationFailed(_))
    ));
    // a value of another key
    assert!(reseal_text(&new, &old, &ct, b"a", &[9u8; 12]).is_err());
    // tampered
    let mut bad = ct.clone().into_bytes();
    bad[20] = if bad[20] == b'A' { b'B' } else { b'A' };
    assert!(reseal_text(
        &old,
        &new,
        std::str::from_utf8(&bad).unwrap(),
        b"a",
        &[9u8; 12]
    )
    .is_err());
    // an output buffer of the wrong size
    let mut bin = vec![0u8; format::decoded_len(&ct).unwrap()];
    let n = format::decode_into(&ct, &mut bin).unwrap();
    let mut out = vec![0u8; ct.len() + 1];
    assert!(matches!(
        new.reseal(&old, &mut bin[..n], b"a", &[9u8; 12], &mut out),
        Err(EkmError::Internal(_))
    ));
}

#[test]
fn stack_secret_hands_out_zeroed_bytes() {
    use ekm_core::crypto::StackSecret;
    let mut s = StackSecret::new();
    let b = s.take(37);
    assert_eq!(b.len(), 37);
    assert!(b.iter().all(|&x| x == 0));
    b.fill(0xaa);
    let b = s.take(512);
    assert!(b[..37].iter().all(|&x| x == 0));
    assert!(std::panic::catch_unwind(move || {
        let mut s = StackSecret::new();
        s.take(513).len()
    })
    .is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn reseal_any(pt in proptest::collection::vec(any::<u8>(), 0..700), ctx in proptest::collection::vec(any::<u8>(), 0..70), n1 in any::<[u8; 12]>(), n2 in any::<[u8; 12]>()) {
        let m = MasterKey::generate().unwrap();
        let (_, old) = new_data_key(&m, &key_id(1)).unwrap();
        let (_, new) = new_data_key(&m, &key_id(2)).unwrap();
        let ct = old.seal(&n1, &pt, &ctx).unwrap();
        let moved = reseal_text(&old, &new, &ct, &ctx, &n2).unwrap();
        prop_assert_eq!(&moved, &new.seal(&n2, &pt, &ctx).unwrap());
    }
}

/// Sizes that come from input are allocated fallibly: an impossible size is
/// an `OutOfMemory` error (53200), never an abort of the process.
#[test]
fn impossible_allocations_are_errors() {
    assert!(matches!(
        ekm_core::crypto::try_zeroed(usize::MAX),
        Err(EkmError::OutOfMemory(_))
    ));
    let mut s = ekm_core::crypto::SecretBuf::new();
    assert!(matches!(s.take(usize::MAX), Err(EkmError::OutOfMemory(_))));
    assert_eq!(EkmError::OutOfMemory(1).sqlstate(), "53200");
    assert_eq!(EkmError::TooLong(1).sqlstate(), "54000");
}

/// The test command also runs these tests under `qemu-x86_64 -cpu Nehalem`
/// (no AES-NI, no CLMUL, no AVX) with `EKM_EXPECT_CPU=nehalem`: this proves
/// the emulated CPU really lacks them, so the suite's passing there shows
/// one build runs on such CPUs (fast paths are chosen at run time).
#[test]
fn runs_on_the_cpu_it_expects() {
    #[cfg(target_arch = "x86_64")]
    {
        let (aes, clmul, avx, ssse3) = (
            std::is_x86_feature_detected!("aes"),
            std::is_x86_feature_detected!("pclmulqdq"),
            std::is_x86_feature_detected!("avx"),
            std::is_x86_feature_detected!("ssse3"),
        );
        eprintln!("cpu: aes={aes} pclmulqdq={clmul} avx={avx} ssse3={ssse3}");
        match std::env::var("EKM_EXPECT_CPU").as_deref() {
            Ok("nehalem") => assert!(!aes && !clmul && !avx && ssse3, "not a Nehalem-class CPU"),
            Ok("qemu64") => assert!(!aes && !avx && !ssse3, "not a baseline x86-64 CPU"),
            _ => {}
        }
    }
}
