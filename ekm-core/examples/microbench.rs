//! Per-value cost of the core crypto path, without PostgreSQL:
//! `cargo run --release -p ekm-core --example microbench`
use chrono::Utc;
use ekm_core::crypto::new_data_key;
use ekm_core::format;
use ekm_core::{KeyId, MasterKey};
use std::hint::black_box;
use std::time::Instant;

fn main() {
    let m = MasterKey::generate().unwrap();
    let (_, k) = new_data_key(&m, &KeyId::new(Utc::now(), 1).unwrap()).unwrap();
    let pt = b"cust000000001@example.com";
    let ct = k.seal(&[7u8; 12], pt, b"").unwrap();
    let n: usize = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let mut out = vec![0u8; format::encoded_len(pt.len())];
    let t = Instant::now();
    for i in 0..n {
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&(i as u64).to_le_bytes());
        k.seal_into(&nonce, black_box(pt), b"", &mut out).unwrap();
        black_box(&out);
    }
    println!(
        "seal_into: {:.1} ns/value",
        t.elapsed().as_nanos() as f64 / n as f64
    );
    let mut buf = vec![0u8; format::decoded_len(&ct).unwrap()];
    let t = Instant::now();
    for _ in 0..n {
        let key = format::key_of(black_box(&ct)).unwrap();
        black_box(key);
        let r = k.open_in(black_box(&ct), b"", &mut buf).unwrap();
        black_box(&buf[r]);
    }
    println!(
        "key_of + open_in: {:.1} ns/value",
        t.elapsed().as_nanos() as f64 / n as f64
    );
    // a rotation's per-value work: decode, open with the old key, seal
    // with the new key (what `_ekm_rotate_value` does)
    let (_, k2) = new_data_key(&m, &KeyId::new(Utc::now(), 2).unwrap()).unwrap();
    let t = Instant::now();
    for i in 0..n {
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let r = k.open_in(black_box(&ct), b"", &mut buf).unwrap();
        k2.seal_into(&nonce, &buf[r], b"", &mut out).unwrap();
        zeroize::Zeroize::zeroize(&mut buf[..]);
        black_box(&out);
    }
    println!(
        "rotate (open_in + seal_into + wipe): {:.1} ns/value",
        t.elapsed().as_nanos() as f64 / n as f64
    );
    let t = Instant::now();
    for i in 0..n {
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let mut scratch = ekm_core::crypto::SecretBuf::new();
        let body = format::body_bytes(black_box(ct.as_bytes())).unwrap();
        let bin = scratch.take(format::decoded_len_of_body(body.len()).unwrap());
        format::b64_decode(body, bin).unwrap();
        k2.reseal(&k, bin, b"", &nonce, &mut out).unwrap();
        black_box(&out);
    }
    println!(
        "rotate (decode + reseal, wiped): {:.1} ns/value",
        t.elapsed().as_nanos() as f64 / n as f64
    );
    let t = Instant::now();
    for _ in 0..n {
        black_box(format::decode_into(black_box(&ct), &mut buf).unwrap());
    }
    {
        use aes_gcm::aead::{AeadInOut, KeyInit};
        let c = aes_gcm::Aes256Gcm::new(&[3u8; 32].into());
        let mut b = [0u8; 25];
        let t = Instant::now();
        for _ in 0..n {
            let tag = c
                .encrypt_inout_detached(&[1u8; 12].into(), b"", black_box(&mut b[..]).into())
                .unwrap();
            black_box(tag);
        }
        println!(
            "raw aes-gcm seal of 25 bytes: {:.1} ns/value",
            t.elapsed().as_nanos() as f64 / n as f64
        );
    }
    println!(
        "base64 decode only: {:.1} ns/value",
        t.elapsed().as_nanos() as f64 / n as f64
    );
}

#[allow(dead_code)]
fn raw() {}
