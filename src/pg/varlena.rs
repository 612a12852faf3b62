//! `text` arguments and results for ekm's V1 C-convention functions (the
//! per-row path and the worker's batch functions): arguments borrowed
//! without a copy, results allocated once.

use crate::pg::error::raise;
use ekm_core::EkmError;
use pgrx::pg_sys;
use pgrx::varlena::{
    set_varsize_4b, varatt_is_1b, varatt_is_1b_e, varatt_is_4b_u, vardata_any, varsize_any_exhdr,
};

pub const VARHDRSZ: usize = pg_sys::VARHDRSZ;

/// The bytes of a `text` argument (detoasted if needed; no copy for plain values).
pub unsafe fn text_arg<'a>(fcinfo: pg_sys::FunctionCallInfo, n: usize) -> Option<&'a [u8]> {
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

pub unsafe fn context_arg<'a>(fcinfo: pg_sys::FunctionCallInfo) -> &'a [u8] {
    unsafe {
        if (*fcinfo).nargs > 1 {
            text_arg(fcinfo, 1).unwrap_or(b"")
        } else {
            b""
        }
    }
}

/// A palloc'd text of `len` data bytes, and those bytes.
pub unsafe fn new_text<'a>(len: usize) -> (*mut pg_sys::varlena, &'a mut [u8]) {
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
