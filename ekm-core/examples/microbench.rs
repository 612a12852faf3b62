//! Per-value cost of the core crypto path, without PostgreSQL:
//! `cargo run --release -p ekm-core --example microbench` (N=iterations)
use chrono::Utc;
use ekm_core::crypto::{new_data_key, SecretBuf};
use ekm_core::format;
use ekm_core::{KeyId, MasterKey};
use std::hint::black_box;
use std::time::Instant;

/// Runs `f(i)` for i in 0..n and prints the time per call.
fn per_value(what: &str, n: usize, mut f: impl FnMut(usize)) {
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    println!(
        "{what}: {:.1} ns/value",
        t.elapsed().as_nanos() as f64 / n as f64
    );
}

/// A distinct nonce per iteration.
fn nonce(i: usize) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&(i as u64).to_le_bytes());
    n
}

fn main() {
    let m = MasterKey::generate().unwrap();
    let (_, k) = new_data_key(&m, &KeyId::new(Utc::now(), 1).unwrap()).unwrap();
    let (_, k2) = new_data_key(&m, &KeyId::new(Utc::now(), 2).unwrap()).unwrap();
    let pt = b"cust000000001@example.com";
    let ct = k.seal(&[7u8; 12], pt, b"").unwrap();
    let n: usize = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let mut out = vec![0u8; format::encoded_len(pt.len())];
    let mut buf = vec![0u8; format::decoded_len(&ct).unwrap()];

    per_value("seal_into", n, |i| {
        k.seal_into(&nonce(i), black_box(pt), b"", &mut out)
            .unwrap();
        black_box(&out);
    });
    per_value("key_of + open_in", n, |_| {
        black_box(format::key_of(black_box(&ct)).unwrap());
        let r = k.open_in(black_box(&ct), b"", &mut buf).unwrap();
        black_box(&buf[r]);
    });
    // a rotation's per-value work (what `_ekm_rotate_value` does): decode,
    // open with the old key, seal with the new one
    per_value("rotate (open_in + seal_into + wipe)", n, |i| {
        let r = k.open_in(black_box(&ct), b"", &mut buf).unwrap();
        k2.seal_into(&nonce(i), &buf[r], b"", &mut out).unwrap();
        zeroize::Zeroize::zeroize(&mut buf[..]);
        black_box(&out);
    });
    per_value("rotate (decode + reseal, wiped)", n, |i| {
        let mut scratch = SecretBuf::new();
        let body = format::body_bytes(black_box(ct.as_bytes())).unwrap();
        let bin = scratch
            .take(format::decoded_len_of_body(body.len()).unwrap())
            .unwrap();
        format::b64_decode(body, bin).unwrap();
        k2.reseal(&k, bin, b"", &nonce(i), &mut out).unwrap();
        black_box(&out);
    });
    per_value("base64 decode only", n, |_| {
        black_box(format::decode_into(black_box(&ct), &mut buf).unwrap());
    });
    {
        use aes_gcm::aead::{AeadInOut, KeyInit};
        let c = aes_gcm::Aes256Gcm::new(&[3u8; 32].into());
        let mut b = [0u8; 25];
        per_value("raw aes-gcm seal of 25 bytes", n, |_| {
            let tag = c
                .encrypt_inout_detached(&[1u8; 12].into(), b"", black_box(&mut b[..]).into())
                .unwrap();
            black_box(tag);
        });
    }
}
