//! `ekm_encrypt` and `ekm_decrypt`: the functions that run once per row.
//! Written against the V1 call convention directly so that each call does
//! exactly one allocation, the result `text` itself: the plaintext is
//! decrypted in place inside it, and the ciphertext is base64-encoded
//! straight into it. Key lookup is a scan of the backend's key cache.

use crate::error::raise;
use crate::keycache;
use ekm_core::format;
use ekm_core::keyid::KEY_REF_LEN;
use ekm_core::EkmError;
use pgrx::pg_sys;
use pgrx::varlena::{
    set_varsize_4b, varatt_is_1b, varatt_is_1b_e, varatt_is_4b_u, vardata_any, varsize_any_exhdr,
};

const VARHDRSZ: usize = pg_sys::VARHDRSZ;

/// The bytes of a `text` argument (detoasted if needed; no copy for plain values).
unsafe fn text_arg<'a>(fcinfo: pg_sys::FunctionCallInfo, n: usize) -> Option<&'a [u8]> {
    unsafe {
        if pgrx::fcinfo::pg_arg_is_null(fcinfo, n) {
            return None;
        }
        let p: *mut pg_sys::varlena = pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, n).cast_mut_ptr();
        // Inline values (short or 4-byte header, uncompressed) are used as
        // they are; only compressed or out-of-line ones go through detoasting.
        let v = if varatt_is_4b_u(p) || (varatt_is_1b(p) && !varatt_is_1b_e(p)) {
            p
        } else {
            pg_sys::pg_detoast_datum_packed(p)
        };
        Some(std::slice::from_raw_parts(
            vardata_any(v) as *const u8,
            varsize_any_exhdr(v),
        ))
    }
}

unsafe fn context_arg<'a>(fcinfo: pg_sys::FunctionCallInfo) -> &'a [u8] {
    unsafe {
        if (*fcinfo).nargs > 1 {
            text_arg(fcinfo, 1).unwrap_or(b"")
        } else {
            b""
        }
    }
}

/// A palloc'd text of `len` data bytes, and those bytes.
unsafe fn new_text<'a>(len: usize) -> (*mut pg_sys::varlena, &'a mut [u8]) {
    unsafe {
        let total = VARHDRSZ + len;
        if total > 0x3fff_ffff {
            raise(EkmError::Internal(
                "value too large for a text datum".into(),
            ));
        }
        let v = pg_sys::palloc(total) as *mut pg_sys::varlena;
        set_varsize_4b(v, total as i32);
        (
            v,
            std::slice::from_raw_parts_mut((v as *mut u8).add(VARHDRSZ), len),
        )
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_ekm_encrypt_v1() -> &'static pg_sys::Pg_finfo_record {
    static R: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &R
}

#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_ekm_decrypt_v1() -> &'static pg_sys::Pg_finfo_record {
    static R: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &R
}

/// `ekm_encrypt(plaintext text [, context text]) -> text`; NULL in, NULL out;
/// a NULL context is the same as none.
#[pgrx::pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn ekm_encrypt_v1(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    unsafe {
        let Some(pt) = text_arg(fcinfo, 0) else {
            return pgrx::fcinfo::pg_return_null(fcinfo);
        };
        let ctx = context_arg(fcinfo);
        let (v, out) = new_text(format::encoded_len(pt.len()));
        if let Err(e) = keycache::with_encrypt_key(|k, nonce| k.seal_into(nonce, pt, ctx, out)) {
            raise(e);
        }
        pg_sys::Datum::from(v)
    }
}

/// `ekm_decrypt(ciphertext text [, context text]) -> text`; NULL in, NULL out.
#[pgrx::pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn ekm_decrypt_v1(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    unsafe {
        let Some(ct) = text_arg(fcinfo, 0) else {
            return pgrx::fcinfo::pg_return_null(fcinfo);
        };
        let ctx = context_arg(fcinfo);
        let r = format::body_bytes(ct).and_then(|body| {
            let n = format::decoded_len_of_body(body.len())?;
            let (v, buf) = new_text(n);
            format::b64_decode(body, buf)?;
            let mut key_ref = [0u8; KEY_REF_LEN];
            key_ref.copy_from_slice(&buf[..KEY_REF_LEN]);
            let range = keycache::with_decrypt_key(&key_ref, |k| k.open_decoded(buf, ctx))?;
            let len = range.len();
            buf.copy_within(range, 0);
            set_varsize_4b(v, (VARHDRSZ + len) as i32);
            Ok(v)
        });
        match r {
            Ok(v) => pg_sys::Datum::from(v),
            Err(e) => raise(e),
        }
    }
}
