//! Plaintext out of the server log. A statement that passed plaintext
//! through ekm (it called ekm_encrypt, ekm_decrypt or ekm_reencrypt, or its
//! text names one of them) may fail for reasons of its own: a cast error
//! quotes the value, a unique violation's DETAIL shows the key, the
//! statement text holds the literal, a slow-statement line or auto_explain's
//! plan repeats it. For every message such a statement logs, the emit_log
//! hook (error.rs) hides the statement text and the CONTEXT lines, replaces
//! the DETAIL in the server log with `(redacted by ekm)` (the client still
//! gets it), removes the statement text from the LOG lines that carry it
//! (log_statement, log_min_duration_statement), replaces auto_explain's plan,
//! and, for data exceptions (SQLSTATE class 22, whose messages quote the
//! value), replaces the quoted parts of the message (for the client too).
//! Messages of statements that did not touch ekm are left alone.
//! `ekm.log_redaction = off` (superuser) turns it off.
//!
//! What it cannot cover (docs/design.md): pg_stat_statements keeps literals
//! of utility statements; a function that calls ekm_encrypt internally on a
//! value passed as a parameter logs that parameter if the statement fails
//! before it is called; `log_statement = 'all'` logs the text of statements
//! that do not name ekm's functions (health warns).

use pgrx::pg_sys;
use std::sync::atomic::{AtomicI64, Ordering};

use ekm_core::redact::{
    mentions_master_key_settings, mentions_plaintext_functions, quotes_key_catalog, redact_quoted,
    redact_quoted_statements, MARKER,
};

/// Start time of the statement that last passed plaintext through ekm in
/// this backend (0: none).
static TOUCHED: AtomicI64 = AtomicI64::new(0);

/// Called by the functions that take or return plaintext: the current
/// statement's messages are redacted. One load and one store per call.
#[inline]
pub fn note_plaintext() {
    let stmt = unsafe { pg_sys::GetCurrentStatementStartTimestamp() };
    if TOUCHED.load(Ordering::Relaxed) != stmt {
        TOUCHED.store(stmt, Ordering::Relaxed);
    }
}

/// Whether the statement being run (the one a message belongs to) passed
/// plaintext through ekm.
fn statement_touched_plaintext() -> bool {
    unsafe {
        let touched = TOUCHED.load(Ordering::Relaxed);
        if touched != 0 && touched == pg_sys::GetCurrentStatementStartTimestamp() {
            return true;
        }
        let q = pg_sys::debug_query_string;
        !q.is_null() && mentions_plaintext_functions(std::ffi::CStr::from_ptr(q).to_bytes())
    }
}

fn pstrdup(s: &str) -> *mut std::ffi::c_char {
    let c = std::ffi::CString::new(s.replace('\0', "")).expect("no NUL");
    unsafe { pg_sys::pstrdup(c.as_ptr()) }
}

/// Whether the statement being run names a master key setting (`ALTER
/// SYSTEM SET ekm.master_key_command = ...`): its text may hold the
/// setting's value, which never reaches the log, whatever
/// `ekm.log_redaction` says.
fn statement_names_master_key_setting() -> bool {
    unsafe {
        let q = pg_sys::debug_query_string;
        !q.is_null() && mentions_master_key_settings(std::ffi::CStr::from_ptr(q).to_bytes())
    }
}

/// A message quoting the command a Citus coordinator sends its key catalog
/// with (Citus logs "issuing ..." under `citus.log_remote_commands`): the
/// command goes, whatever `ekm.log_redaction` says.
unsafe fn redact_key_catalog(e: &mut pg_sys::ErrorData) {
    if e.message.is_null() {
        return;
    }
    let m = unsafe { std::ffi::CStr::from_ptr(e.message) };
    if quotes_key_catalog(m.to_bytes()) {
        let head = m.to_string_lossy();
        let head = head.split("SELECT").next().unwrap_or("").trim_end();
        e.message = pstrdup(&format!("{head} SELECT ekm._ekm_cluster_apply({MARKER})"));
    }
}

/// Redacts, in the server log, the lines of a DETAIL that quote another
/// session's statement naming ekm's plaintext functions or a master key
/// setting (a deadlock report), whatever the reporting statement was. The
/// log shows `detail_log` when there is one, else `detail`; the client's
/// `detail` is left alone.
unsafe fn redact_other_sessions(e: &mut pg_sys::ErrorData) {
    let logged = if e.detail_log.is_null() {
        e.detail
    } else {
        e.detail_log
    };
    if logged.is_null() {
        return;
    }
    let text = unsafe { std::ffi::CStr::from_ptr(logged) }.to_string_lossy();
    if let Some(r) = redact_quoted_statements(&text) {
        e.detail_log = pstrdup(&r);
    }
}

/// Redacts `edata` if its statement passed plaintext through ekm or names a
/// master key setting, and the quoted statements of other sessions that do
/// (from the emit_log_hook, for the server log).
///
/// # Safety
/// `edata` is the ErrorData the hook was given.
pub unsafe fn redact(edata: *mut pg_sys::ErrorData) {
    unsafe { redact_key_catalog(&mut *edata) };
    let secret_setting = statement_names_master_key_setting();
    if !secret_setting && !crate::pg::gucs::log_redaction() {
        return;
    }
    unsafe { redact_other_sessions(&mut *edata) };
    if !secret_setting && !statement_touched_plaintext() {
        return;
    }
    unsafe {
        let e = &mut *edata;
        e.hide_stmt = true;
        e.hide_ctx = true;
        if !e.detail.is_null() || !e.detail_log.is_null() {
            // the server log shows detail_log instead of detail
            e.detail_log = pstrdup(MARKER);
        }
        if e.message.is_null() {
            return;
        }
        let msg = std::ffi::CStr::from_ptr(e.message)
            .to_string_lossy()
            .into_owned();
        let id = if e.message_id.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(e.message_id)
                .to_string_lossy()
                .into_owned()
        };
        let new = if id.starts_with("duration: %.3f ms  plan:") {
            // auto_explain: the plan (and its query text) goes
            msg.split_once("plan:")
                .map(|(head, _)| format!("{head}plan: {MARKER}"))
        } else if e.elevel == pg_sys::LOG as i32 {
            // log_statement and log_min_duration_statement lines carry the
            // statement's text itself
            let q = pg_sys::debug_query_string;
            (!q.is_null())
                .then(|| std::ffi::CStr::from_ptr(q).to_string_lossy().into_owned())
                .filter(|q| !q.is_empty() && msg.contains(q.as_str()))
                .map(|q| msg.replace(q.as_str(), MARKER))
        } else if (e.sqlerrcode & 0x3f) == (b'2' - b'0') as i32
            && ((e.sqlerrcode >> 6) & 0x3f) == (b'2' - b'0') as i32
        {
            // class 22, data exception: the message quotes the value
            Some(redact_quoted(&msg))
        } else {
            None
        };
        if let Some(n) = new {
            e.message = pstrdup(&n);
        }
    }
}
