//! The rotation worker's per-value functions (`pg_temp._ekm_*`, created by
//! each worker in its own temporary schema, src/jobs/worker.rs): what a
//! batch moves and how, what a check counts, what a scan finds. They act
//! only inside the worker's own batches (`BatchGate`).

use crate::keys::keycache;
use crate::pg::error::raise;
use crate::pg::varlena::{context_arg, new_text, text_arg};
use ekm_core::crypto::SecretBuf;
use ekm_core::fernet::{self, FernetValue};
use ekm_core::format;
use ekm_core::EkmError;
use pgrx::pg_sys;

/// A Fernet value on a rotating imported key re-encrypted under the active
/// ekm key with `ctx` (the plaintext only in wiped scratch); None if the
/// value is not Fernet or its key is not rotating. Errors: it does not open.
fn move_fernet(v: &[u8], ctx: &[u8]) -> Result<Option<*mut pg_sys::varlena>, EkmError> {
    let Some(fv) = fernet::parse(v) else {
        return Ok(None);
    };
    if keycache::fernet_state(&fv)? != Some(ekm_core::KeyState::Rotating) {
        return Ok(None);
    }
    let mut scratch = SecretBuf::new();
    let buf = scratch.take(fernet::decoded_capacity(fv.token().len()))?;
    let range = keycache::fernet_open(&fv, buf)?;
    let plain = &buf[range];
    let (out, bytes) = unsafe { new_text(format::encoded_len(plain.len())) };
    keycache::with_encrypt_key(|k, nonce| k.seal_into(nonce, plain, ctx, bytes))?;
    Ok(Some(out))
}

/// Whether a value is a Fernet value on a rotating imported key.
fn on_rotating_fernet_key(v: &[u8]) -> bool {
    match fernet::parse(v) {
        Some(fv) => match keycache::fernet_state(&fv) {
            Ok(s) => s == Some(ekm_core::KeyState::Rotating),
            Err(e) => raise(e),
        },
        None => false,
    }
}

// ---- the rotation worker's per-value functions ----
//
// The worker creates them in its own temporary schema (pg_temp._ekm_*) and
// calls them in its batches, which run as each table's owner. They act only
// while the worker has a batch open (`BatchGate`), and only with the
// contexts of that batch's columns: anything else that reaches them (a
// trigger running during the batch) gets an error. The two that write
// ciphertexts (`_ekm_rotate_value`, `_ekm_encrypt_plain`) also take the
// batch's token, a random number the batch statement passes as a bound
// parameter: a trigger of the table, which runs inside the batch with the
// same contexts, cannot know it, so it cannot use them to encrypt values of
// its own choosing (an encryption oracle for a table owner who may not call
// ekm_encrypt).

/// The contexts of the batch the worker is running now; None outside one.
struct Gate {
    contexts: Vec<Vec<u8>>,
    token: i64,
}

thread_local! {
    static GATE: std::cell::RefCell<Option<Gate>> = const { std::cell::RefCell::new(None) };
}

/// Open while the worker runs a batch (or a count) whose per-value
/// functions use `contexts`; closed when dropped.
pub struct BatchGate(i64);

impl BatchGate {
    pub fn open(contexts: &[String]) -> BatchGate {
        let contexts = contexts.iter().map(|c| c.as_bytes().to_vec()).collect();
        let mut t = [0u8; 8];
        if let Err(e) = ekm_core::crypto::os_random(&mut t) {
            raise(e);
        }
        let token = i64::from_ne_bytes(t);
        GATE.with(|g| *g.borrow_mut() = Some(Gate { contexts, token }));
        BatchGate(token)
    }

    /// The token the batch statement passes to the functions that write.
    pub fn token(&self) -> i64 {
        self.0
    }
}

impl Drop for BatchGate {
    fn drop(&mut self) {
        GATE.with(|g| *g.borrow_mut() = None);
    }
}

/// Raises 42501 unless a batch is open (and, for `ctx`, uses that
/// context; for `token`, is the batch with that token).
fn check_gate(ctx: Option<&[u8]>, token: Option<i64>) {
    let ok = GATE.with(|g| match &*g.borrow() {
        None => false,
        Some(gate) => {
            ctx.is_none_or(|c| gate.contexts.iter().any(|x| x.as_slice() == c))
                && token.is_none_or(|t| t == gate.token)
        }
    });
    if !ok {
        crate::pg::error::raise_with(
            pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "this ekm function works only inside ekm's own batches".into(),
            Some("encrypt and decrypt with ekm_encrypt, ekm_decrypt and ekm_reencrypt".into()),
        );
    }
}

thread_local! {
    /// Values moved per column position by `_ekm_rotate_value` /
    /// `_ekm_encrypt_plain` in this backend (the worker reads and resets them
    /// around each batch).
    static MOVED: std::cell::RefCell<[i64; 64]> = const { std::cell::RefCell::new([0; 64]) };
}

/// Resets the moved-value counters.
pub fn reset_moved() {
    MOVED.with(|m| *m.borrow_mut() = [0; 64]);
}

/// The moved-value counters of the first `n` column positions.
pub fn moved(n: usize) -> Vec<i64> {
    MOVED.with(|m| m.borrow()[..n.min(64)].to_vec())
}

/// The batch token a writing batch function was given (argument 4; 0 if
/// missing or NULL, which no batch's token is checked against successfully
/// except by chance one in 2^64).
fn token_arg(fcinfo: pg_sys::FunctionCallInfo) -> i64 {
    unsafe {
        if (*fcinfo).nargs < 4 || pgrx::fcinfo::pg_arg_is_null(fcinfo, 3) {
            return 0;
        }
        pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, 3).value() as i64
    }
}

fn count_moved(fcinfo: pg_sys::FunctionCallInfo) {
    let i = unsafe { pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, 2) }.value() as i32;
    if (0..64).contains(&i) {
        MOVED.with(|m| m.borrow_mut()[i as usize] += 1);
    }
}

/// Whether a stored value is on a rotating key: an ekm key, or an imported
/// Fernet key (what a rotation moves).
fn on_rotating_key(v: &[u8]) -> bool {
    match format::key_ref_of_bytes(v) {
        Some(r) => match keycache::state_of(&r) {
            Ok(s) => s == Some(ekm_core::KeyState::Rotating),
            Err(e) => raise(e),
        },
        None => on_rotating_fernet_key(v),
    }
}

fn is_plaintext(v: &[u8]) -> bool {
    match std::str::from_utf8(v) {
        Ok(s) => !format::looks_encrypted(s) && !format::looks_foreign(s),
        Err(_) => true, // ekm's and other schemes' ciphertexts are ASCII
    }
}

macro_rules! v1_finfo {
    ($name:ident) => {
        #[unsafe(no_mangle)]
        pub extern "C" fn $name() -> &'static pg_sys::Pg_finfo_record {
            static R: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
            &R
        }
    };
}
v1_finfo!(pg_finfo_ekm_on_rotating_key_v1);
v1_finfo!(pg_finfo_ekm_rotate_value_v1);
v1_finfo!(pg_finfo_ekm_encrypt_plain_v1);
v1_finfo!(pg_finfo_ekm_is_plaintext_v1);
v1_finfo!(pg_finfo_ekm_left_v1);
v1_finfo!(pg_finfo_ekm_keys_in_v1);

/// What a scan of the database records for a bare Fernet token that no
/// imported key that may decrypt authenticates (it may be on a retired
/// imported key, or on one never imported): not a key id (ids have no `:`).
pub const FERNET_UNATTRIBUTED: &str = "fernet:unknown-key";

/// `pg_temp._ekm_keys_in(value text) -> text[]` (STRICT), for
/// `ekm_scan_database`: the key of every ekm ciphertext embedded in the value
/// (a whole value, or inside JSON, an array's text form, free text); once
/// Fernet keys are imported, also of every runbook value (the key a
/// FERNET_V2 value names; for a bare token the key that authenticates it, or
/// [`FERNET_UNATTRIBUTED`]).
#[pgrx::pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn ekm_keys_in_v1(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    check_gate(None, None);
    unsafe {
        let v = text_arg(fcinfo, 0).unwrap_or(b"");
        let mut keys: Vec<String> = match std::str::from_utf8(v) {
            Ok(s) => format::embedded_keys(s)
                .iter()
                .map(|k| k.to_string())
                .collect(),
            Err(_) => Vec::new(),
        };
        if keycache::fernet_imported().unwrap_or_else(|e| raise(e)) {
            for fv in fernet::embedded(v) {
                keys.push(match fv {
                    FernetValue::V2 { key_id, .. } => key_id.to_string(),
                    FernetValue::Bare { .. } => keycache::fernet_key_id(&fv)
                        .unwrap_or_else(|_| FERNET_UNATTRIBUTED.to_string()),
                });
            }
        }
        match pgrx::IntoDatum::into_datum(keys) {
            Some(d) => d,
            None => pgrx::fcinfo::pg_return_null(fcinfo),
        }
    }
}

/// `pg_temp._ekm_left(value text, context text) -> int` (STRICT), for a
/// rotation's check: 0 if the value is not on a rotating key, 1 if it is and
/// can be moved (it opens with `context`), 2 if it is but cannot be (it does
/// not open: bound to another context, altered, malformed).
#[pgrx::pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn ekm_left_v1(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    unsafe {
        let v = text_arg(fcinfo, 0).unwrap_or(b"");
        let ctx = context_arg(fcinfo);
        check_gate(Some(ctx), None);
        if let Some(fv) = fernet::parse(v) {
            return pg_sys::Datum::from(fernet_left(&fv));
        }
        if !on_rotating_key(v) {
            return pg_sys::Datum::from(0i32);
        }
        let opens = std::str::from_utf8(v).ok().and_then(|s| {
            let k = format::key_of(s).ok()?;
            keycache::with_decrypt_key(&k.to_ref(), |key| {
                let mut scratch = SecretBuf::new();
                let bin = scratch.take(format::decoded_len(s)?)?;
                let n = format::decode_into(s, bin)?;
                key.open_decoded(&mut bin[..n], ctx).map(|_| ())
            })
            .ok()
        });
        pg_sys::Datum::from(if opens.is_some() { 1i32 } else { 2i32 })
    }
}

/// `_ekm_left` for a Fernet value. Once keys are imported, ekm answers for
/// Fernet values: on a rotating imported key, 1 if it opens (the context
/// does not apply), 2 if not; a value no imported key names or
/// authenticates, 2 (a problem value: it keeps the keys from retiring); on
/// a retired or destroyed key, 0 (as for ekm's keys: health reports it).
/// Without imported keys they are another scheme's values: 0.
fn fernet_left(fv: &FernetValue) -> i32 {
    match keycache::fernet_imported() {
        Ok(false) => return 0,
        Ok(true) => {}
        Err(e) => raise(e),
    }
    match keycache::fernet_state(fv) {
        Ok(Some(ekm_core::KeyState::Rotating)) => {
            let mut scratch = SecretBuf::new();
            let opens = scratch
                .take(fernet::decoded_capacity(fv.token().len()))
                .and_then(|buf| keycache::fernet_open(fv, buf))
                .is_ok();
            if opens {
                1
            } else {
                2
            }
        }
        Ok(None) => 2,
        Ok(Some(_)) => 0,
        Err(e) => raise(e),
    }
}

/// `pg_temp._ekm_is_plaintext(value text) -> bool` (STRICT): what a column
/// encryption moves: plaintext (not an ekm ciphertext, not another
/// scheme's), and Fernet values on rotating imported keys.
#[pgrx::pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn ekm_is_plaintext_v1(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    check_gate(None, None);
    unsafe {
        let v = text_arg(fcinfo, 0).unwrap_or(b"");
        pg_sys::Datum::from(is_plaintext(v) || on_rotating_fernet_key(v))
    }
}

/// `ekm._ekm_on_rotating_key(value text) -> bool` (STRICT): whether a stored
/// value is on a `rotating` key (what a rotation moves).
#[pgrx::pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn ekm_on_rotating_key_v1(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    check_gate(None, None);
    unsafe {
        let v = text_arg(fcinfo, 0).unwrap_or(b"");
        pg_sys::Datum::from(on_rotating_key(v))
    }
}

/// `ekm._ekm_rotate_value(value text, context text, position int, token int8) -> text`
/// (STRICT): a value on a rotating key re-encrypted under the active key
/// (counted at `position`); any other value returned as it is.
#[pgrx::pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn ekm_rotate_value_v1(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    unsafe {
        let v = text_arg(fcinfo, 0).unwrap_or(b"");
        let ctx = context_arg(fcinfo);
        check_gate(Some(ctx), Some(token_arg(fcinfo)));
        let Some(key_ref) = format::key_ref_of_bytes(v) else {
            return fernet_moved(fcinfo, v, ctx);
        };
        // decoded into wiped scratch, re-encrypted there in place (without
        // AES-NI the plaintext is in it in between), encoded into the result
        let r = keycache::with_rotation(&key_ref, |old, new, nonce| {
            let body = format::body_bytes(v)?;
            let mut scratch = SecretBuf::new();
            let bin = scratch.take(format::decoded_len_of_body(body.len())?)?;
            format::b64_decode(body, bin)?;
            let n = format::encoded_len(bin.len().saturating_sub(format::OVERHEAD));
            let (out, bytes) = new_text(n);
            new.reseal(old, bin, ctx, nonce, bytes)?;
            Ok(out)
        });
        // A value that does not open with the column's context (bound to
        // another one, altered) or is malformed stays as it is: the job's
        // check records it in ekm.rotation_problem and the job ends
        // needs_attention instead of failing at the first one.
        moved_or_same(fcinfo, r, |e| {
            matches!(
                e,
                EkmError::AuthenticationFailed(_) | EkmError::Malformed(_)
            )
        })
    }
}

/// A batch function's answer for a value that is not an ekm ciphertext: a
/// Fernet value on a rotating imported key moved onto the active key
/// (counted); one that does not open stays as it is (the job's check
/// records it); anything else is returned as it is.
unsafe fn fernet_moved(fcinfo: pg_sys::FunctionCallInfo, v: &[u8], ctx: &[u8]) -> pg_sys::Datum {
    unsafe {
        moved_or_same(fcinfo, move_fernet(v, ctx), |e| {
            matches!(
                e,
                EkmError::FernetAuthenticationFailed(_)
                    | EkmError::FernetMalformed(_)
                    | EkmError::FernetKeyNotImported(_)
                    | EkmError::NoFernetKeys
            )
        })
    }
}

/// A batch function's result: the moved value (counted), or the argument
/// as it is when nothing moved or the error is one `stays` leaves to the
/// job's check; any other error is raised.
unsafe fn moved_or_same<T: Into<pg_sys::Datum>>(
    fcinfo: pg_sys::FunctionCallInfo,
    r: Result<Option<T>, EkmError>,
    stays: impl Fn(&EkmError) -> bool,
) -> pg_sys::Datum {
    unsafe {
        match r {
            Ok(Some(out)) => {
                count_moved(fcinfo);
                out.into()
            }
            Ok(None) => pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, 0),
            Err(e) if stays(&e) => pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, 0),
            Err(e) => raise(e),
        }
    }
}

/// `ekm._ekm_encrypt_plain(value text, context text, position int, token int8) -> text`
/// (STRICT): a plaintext value encrypted under the active key (counted at
/// `position`); ekm and foreign ciphertexts returned as they are.
#[pgrx::pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn ekm_encrypt_plain_v1(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    unsafe {
        let v = text_arg(fcinfo, 0).unwrap_or(b"");
        let ctx = context_arg(fcinfo);
        check_gate(Some(ctx), Some(token_arg(fcinfo)));
        if !is_plaintext(v) {
            // the runbook's values on rotating imported keys move too
            return fernet_moved(fcinfo, v, ctx);
        }
        let (out, bytes) = new_text(format::encoded_len(v.len()));
        if let Err(e) = keycache::with_encrypt_key(|k, nonce| k.seal_into(nonce, v, ctx, bytes)) {
            raise(e);
        }
        count_moved(fcinfo);
        pg_sys::Datum::from(out)
    }
}
