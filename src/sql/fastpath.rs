//! `ekm_encrypt` and `ekm_decrypt`: the functions that run once per row.
//! Written against the V1 call convention directly so that each call does
//! exactly one allocation, the result `text` itself: the plaintext is
//! decrypted in place inside it, and the ciphertext is base64-encoded
//! straight into it. Key lookup is a scan of the backend's key cache.
use crate::keys::keycache;
use crate::pg::error::raise;
use crate::pg::varlena::{context_arg, new_text, text_arg, VARHDRSZ};
use ekm_core::fernet::{self, FernetValue};
use ekm_core::format;
use ekm_core::keyid::KEY_REF_LEN;
use ekm_core::EkmError;
use pgrx::pg_sys;
use pgrx::varlena::set_varsize_4b;

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
        crate::pg::redact::note_plaintext();
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
        crate::pg::redact::note_plaintext();
        let ctx = context_arg(fcinfo);
        let r = match format::body_bytes(ct) {
            Ok(body) => (|| {
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
            })(),
            // the runbook's values (the context does not apply: Fernet has none)
            Err(EkmError::NotCiphertext) => match fernet::parse(ct) {
                Some(fv) => decrypt_fernet(&fv),
                None => Err(EkmError::NotCiphertext),
            },
            Err(e) => Err(e),
        };
        match r {
            Ok(v) => pg_sys::Datum::from(v),
            Err(e) => raise(e),
        }
    }
}

/// A Fernet value decrypted into a new text (one allocation, as for ekm's).
unsafe fn decrypt_fernet(fv: &FernetValue) -> Result<*mut pg_sys::varlena, EkmError> {
    unsafe {
        let (v, buf) = new_text(fernet::decoded_capacity(fv.token().len()));
        let range = keycache::fernet_open(fv, buf)?;
        let len = range.len();
        buf.copy_within(range, 0);
        set_varsize_4b(v, (VARHDRSZ + len) as i32);
        Ok(v)
    }
}
