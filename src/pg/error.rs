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
        if !edata.is_null() {
            hide_master_key_setting(edata);
            crate::pg::redact::redact(edata);
        }
        if let Some(prev) = PREV_EMIT_LOG_HOOK {
            prev(edata);
        }
    }
}

/// A configuration reload logs `parameter "X" changed to "value"` with the
/// value from the file: for the master key settings (a command may carry a
/// token) the line keeps the name and drops the value. Recognized by the
/// untranslated message, so it works in every language; runs in the
/// postmaster too, where reloads are logged.
unsafe fn hide_master_key_setting(edata: *mut pg_sys::ErrorData) {
    unsafe {
        let (id, msg) = ((*edata).message_id, (*edata).message);
        if id.is_null() || msg.is_null() {
            return;
        }
        if std::ffi::CStr::from_ptr(id).to_bytes() != b"parameter \"%s\" changed to \"%s\"" {
            return;
        }
        let text = std::ffi::CStr::from_ptr(msg).to_bytes();
        for name in [
            "ekm.master_key_command",
            "ekm.master_key_file",
            "ekm.previous_master_key_command",
            "ekm.previous_master_key_file",
        ] {
            let quoted = format!("\"{name}\"");
            if text.windows(quoted.len()).any(|w| w == quoted.as_bytes()) {
                let hidden = std::ffi::CString::new(format!(
                    "parameter {quoted} changed (its value is not logged)"
                ))
                .expect("no NUL");
                (*edata).message = pg_sys::pstrdup(hidden.as_ptr());
                return;
            }
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

/// Raises `e` as an ERROR. (`track_caller`: the report's LOCATION names the
/// line that raised it, not this file.)
#[track_caller]
pub fn raise(e: EkmError) -> ! {
    raise_with(code(&e), e.to_string(), e.hint())
}

#[track_caller]
pub fn raise_with(code: PgSqlErrorCode, message: String, hint: Option<String>) -> ! {
    HIDE_NEXT_STATEMENT.store(true, Ordering::Relaxed);
    let mut r = ErrorReport::new(code, message, "ekm");
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
    #[track_caller]
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => raise(e),
        }
    }
}

/// Refuses (25006) to `what` on a standby, naming the call to run on the primary.
pub fn refuse_on_standby(what: &str, call: &str) {
    if unsafe { pg_sys::RecoveryInProgress() } {
        raise_with(
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            format!("cannot {what} on a standby"),
            Some(format!("run {call} on the primary; the standby follows")),
        );
    }
}

/// Any error as ekm's internal error (XX000).
pub fn internal(e: impl std::fmt::Display) -> EkmError {
    EkmError::Internal(e.to_string())
}
