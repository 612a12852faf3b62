//! Turns `EkmError` into a PostgreSQL ERROR with SQLSTATE, message and hint.
//! ekm's errors never carry plaintext or key bytes, and the server log line
//! for them omits the statement text (which may hold a plaintext literal).

use ekm_core::EkmError;
use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};
use std::sync::atomic::{AtomicBool, Ordering};

static HIDE_NEXT_STATEMENT: AtomicBool = AtomicBool::new(false);
static mut PREV_EMIT_LOG_HOOK: pg_sys::emit_log_hook_type = None;

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn emit_log_hook(edata: *mut pg_sys::ErrorData) {
    unsafe {
        if HIDE_NEXT_STATEMENT.swap(false, Ordering::Relaxed) && !edata.is_null() {
            (*edata).hide_stmt = true;
            (*edata).hide_ctx = true;
        }
        if let Some(prev) = PREV_EMIT_LOG_HOOK {
            prev(edata);
        }
    }
}

pub fn init() {
    unsafe {
        PREV_EMIT_LOG_HOOK = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(emit_log_hook);
    }
}

fn code(e: &EkmError) -> PgSqlErrorCode {
    use PgSqlErrorCode::*;
    match e.sqlstate() {
        "22P02" => ERRCODE_INVALID_TEXT_REPRESENTATION,
        "0A000" => ERRCODE_FEATURE_NOT_SUPPORTED,
        "22P03" => ERRCODE_INVALID_BINARY_REPRESENTATION,
        "XX001" => ERRCODE_DATA_CORRUPTED,
        "42704" => ERRCODE_UNDEFINED_OBJECT,
        "55000" => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        "22023" => ERRCODE_INVALID_PARAMETER_VALUE,
        "58000" => ERRCODE_SYSTEM_ERROR,
        "F0000" => ERRCODE_CONFIG_FILE_ERROR,
        "28000" => ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION,
        "54000" => ERRCODE_PROGRAM_LIMIT_EXCEEDED,
        "53200" => ERRCODE_OUT_OF_MEMORY,
        "42P01" => ERRCODE_UNDEFINED_TABLE,
        "42809" => ERRCODE_WRONG_OBJECT_TYPE,
        _ => ERRCODE_INTERNAL_ERROR,
    }
}

/// Raises `e` as an ERROR.
pub fn raise(e: EkmError) -> ! {
    raise_with(code(&e), e.to_string(), e.hint())
}

pub fn raise_with(code: PgSqlErrorCode, message: String, hint: Option<String>) -> ! {
    HIDE_NEXT_STATEMENT.store(true, Ordering::Relaxed);
    let mut r = ErrorReport::new(code, message, "");
    if let Some(h) = hint {
        r = r.set_hint(h);
    }
    r.report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for Result<T, EkmError> {
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => raise(e),
        }
    }
}
