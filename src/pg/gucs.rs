//! ekm's settings. The master key sources change only with a reload, are
//! left out of `SHOW ALL` and `pg_settings`, and show as `(hidden)` to
//! everyone, `pg_read_all_settings` included (a show hook): their value
//! (a command may carry a token) is only in the configuration file.

use ekm_core::Policy;
use pgrx::{pg_sys, GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

static MASTER_KEY_COMMAND: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static MASTER_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static PREVIOUS_MASTER_KEY_COMMAND: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
static PREVIOUS_MASTER_KEY_FILE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
static KEY_LIFETIME_DAYS: GucSetting<i32> = GucSetting::<i32>::new(90);
static ROTATION_DUE_AGE_DAYS: GucSetting<i32> = GucSetting::<i32>::new(76);
static ROTATION_WARNING_DAYS: GucSetting<i32> = GucSetting::<i32>::new(14);
static ROTATION_DUE_ENCRYPTIONS: GucSetting<f64> = GucSetting::<f64>::new(2_147_483_648.0);
static ROTATION_BATCH_PAUSE_MS: GucSetting<i32> = GucSetting::<i32>::new(0);
static ROTATION_RETRY_PAUSE_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
static ROTATION_LOCK_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(100);
static ROTATION_VACUUM_GROWTH: GucSetting<f64> = GucSetting::<f64>::new(0.02);
static ROTATION_MAX_REPLICA_LAG_MS: GucSetting<i32> = GucSetting::<i32>::new(0);
static ROTATION_MAX_ACTIVE_SESSIONS: GucSetting<i32> = GucSetting::<i32>::new(0);
static ROTATION_TARGET_APP_SHARE: GucSetting<f64> = GucSetting::<f64>::new(0.0);
static ROTATION_WORKERS: GucSetting<i32> = GucSetting::<i32>::new(1);
static AUTO_ROTATE: GucSetting<bool> = GucSetting::<bool>::new(false);
static AUTO_ROTATE_DATABASES: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
static AUTO_ROTATE_NAPTIME_S: GucSetting<i32> = GucSetting::<i32>::new(60);
static MASTER_KEY_COMMAND_TIMEOUT_S: GucSetting<i32> = GucSetting::<i32>::new(10);
static DEBUG_PAUSE_POINTS: GucSetting<bool> = GucSetting::<bool>::new(false);
static LOG_REDACTION: GucSetting<bool> = GucSetting::<bool>::new(true);
static LOCK_WAIT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(60_000);
static BATCH_SEARCH_PATH: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// What `SHOW`, `current_setting()` and every other reader of a master key
/// setting see: `(hidden)` when it is set, nothing when it is not.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn show_master_key_command() -> *const std::ffi::c_char {
    hidden(&MASTER_KEY_COMMAND)
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn show_master_key_file() -> *const std::ffi::c_char {
    hidden(&MASTER_KEY_FILE)
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn show_previous_master_key_command() -> *const std::ffi::c_char {
    hidden(&PREVIOUS_MASTER_KEY_COMMAND)
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn show_previous_master_key_file() -> *const std::ffi::c_char {
    hidden(&PREVIOUS_MASTER_KEY_FILE)
}

fn hidden(s: &GucSetting<Option<CString>>) -> *const std::ffi::c_char {
    if non_empty(s).is_some() {
        c"(hidden)".as_ptr()
    } else {
        c"".as_ptr()
    }
}

pub fn init() {
    let secret = GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL;
    // SAFETY: the hooks are 'static functions that only read the settings.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"ekm.master_key_command",
            c"Command whose standard output is the 256-bit master key (64 hex digits or base64).",
            c"Run by the server, like ssl_passphrase_command. Takes precedence over ekm.master_key_file. Shown as (hidden).",
            &MASTER_KEY_COMMAND,
            GucContext::Sighup,
            secret,
            None,
            None,
            Some(show_master_key_command),
        );
        GucRegistry::define_string_guc_with_hooks(
            c"ekm.master_key_file",
            c"File holding the 256-bit master key (64 hex digits or base64).",
            c"With neither this nor ekm.master_key_command set, a development key file is created in the data directory. Shown as (hidden).",
            &MASTER_KEY_FILE,
            GucContext::Sighup,
            secret,
            None,
            None,
            Some(show_master_key_file),
        );
        GucRegistry::define_string_guc_with_hooks(
            c"ekm.previous_master_key_command",
            c"While the master key is rotated: a command whose output is the previous master key.",
            c"Keys still wrapped under it keep working; SELECT ekm_rotate_master_key() re-wraps them under the current one. Shown as (hidden).",
            &PREVIOUS_MASTER_KEY_COMMAND,
            GucContext::Sighup,
            secret,
            None,
            None,
            Some(show_previous_master_key_command),
        );
        GucRegistry::define_string_guc_with_hooks(
            c"ekm.previous_master_key_file",
            c"While the master key is rotated: a file holding the previous master key.",
            c"Keys still wrapped under it keep working; SELECT ekm_rotate_master_key() re-wraps them under the current one. Shown as (hidden).",
            &PREVIOUS_MASTER_KEY_FILE,
            GucContext::Sighup,
            secret,
            None,
            None,
            Some(show_previous_master_key_file),
        );
    }
    GucRegistry::define_int_guc(
        c"ekm.master_key_command_timeout",
        c"Seconds ekm.master_key_command may run before it is stopped and the key counts as unavailable.",
        c"",
        &MASTER_KEY_COMMAND_TIMEOUT_S,
        1,
        3600,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"ekm.key_lifetime_days",
        c"Days a data key lives before it expires.",
        c"",
        &KEY_LIFETIME_DAYS,
        1,
        36500,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"ekm.rotation_due_age_days",
        c"Age in days at which the active key is due for rotation.",
        c"",
        &ROTATION_DUE_AGE_DAYS,
        0,
        36500,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"ekm.rotation_warning_days",
        c"Rotation is due when fewer than this many days remain before the key expires.",
        c"",
        &ROTATION_WARNING_DAYS,
        0,
        36500,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_float_guc(
        c"ekm.rotation_due_encryptions",
        c"Encryptions under one key after which it is due for rotation.",
        c"AES-GCM with random 96-bit nonces allows at most 2^32 encryptions per key (NIST SP 800-38D).",
        &ROTATION_DUE_ENCRYPTIONS,
        1.0,
        ekm_core::lifecycle::NONCE_BOUND,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"ekm.rotation_batch_pause",
        c"Pause between rotation batches, in milliseconds (slows a rotation on a busy server).",
        c"",
        &ROTATION_BATCH_PAUSE_MS,
        0,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"ekm.rotation_retry_pause",
        c"Pause before a rotation retries rows or batches it had to skip, in milliseconds.",
        c"",
        &ROTATION_RETRY_PAUSE_MS,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"ekm.rotation_lock_timeout",
        c"lock_timeout of rotation batches, in milliseconds: a batch never waits longer for an application's lock.",
        c"",
        &ROTATION_LOCK_TIMEOUT_MS,
        1,
        600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_float_guc(
        c"ekm.rotation_vacuum_growth",
        c"A rotation vacuums the table behind its batches each time they have rewritten this share of its size (0: never).",
        c"Bounds the table's growth during a rotation (heap, TOAST and indexes) to about this share: later batches reuse the space the vacuum freed.",
        &ROTATION_VACUUM_GROWTH,
        0.0,
        1.0,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"ekm.rotation_max_replica_lag",
        c"A rotation pauses while a streaming standby's replay lag exceeds this, in milliseconds (0: never).",
        c"The largest replay_lag in pg_stat_replication.",
        &ROTATION_MAX_REPLICA_LAG_MS,
        0,
        86_400_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"ekm.rotation_max_active_sessions",
        c"A rotation pauses while more client sessions than this are running a statement (0: never).",
        c"Sessions in state active in pg_stat_activity, in every database, the rotation's own excepted.",
        &ROTATION_MAX_ACTIVE_SESSIONS,
        0,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_float_guc(
        c"ekm.rotation_target_app_share",
        c"A rotation paces its batches to keep the application's write throughput at this share of what it is without the rotation (0: off).",
        c"Measured from the transaction ids the application's transactions take, with and without batches running.",
        &ROTATION_TARGET_APP_SHARE,
        0.0,
        0.99,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"ekm.rotation_workers",
        c"Background workers a rotation job runs at most at once: its own and helpers that take other tables and partitions.",
        c"Each worker takes a cursor group (a table or partition) no other worker has; the job's own worker alone runs the checks, the fence and the final step.",
        &ROTATION_WORKERS,
        1,
        64,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"ekm.auto_rotate",
        c"Whether the ekm launcher starts a rotation by itself when the active key is due.",
        c"Only in the databases listed in ekm.auto_rotate_databases.",
        &AUTO_ROTATE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"ekm.auto_rotate_databases",
        c"Comma-separated databases in which ekm.auto_rotate may start rotations.",
        c"",
        &AUTO_ROTATE_DATABASES,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"ekm.auto_rotate_naptime",
        c"Seconds between the launcher's checks for due keys.",
        c"",
        &AUTO_ROTATE_NAPTIME_S,
        1,
        86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        c"ekm.log_redaction",
        c"Whether the server log leaves out the statement text, DETAIL and CONTEXT (and quoted values of data errors) of statements that passed plaintext through ekm.",
        c"See the README, Security model.",
        &LOG_REDACTION,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"ekm.lock_wait_timeout",
        c"Longest wait for one of ekm's own locks (a job's final step, another key change), in milliseconds; then an error.",
        c"The caller's lock_timeout applies instead when it is shorter.",
        &LOCK_WAIT_TIMEOUT_MS,
        1,
        86_400_000,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_string_guc(
        c"ekm.batch_search_path",
        c"search_path of the application's triggers, constraints and defaults while ekm's batches update a table (empty: the one the table's owner gets at login).",
        c"Set it to 'pg_catalog, pg_temp' to run that code with no schema of the application's on the path, as VACUUM does.",
        &BATCH_SEARCH_PATH,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"ekm.debug_pause_points",
        c"For tests: rotation workers wait at named protocol steps while a session holds that step's advisory lock.",
        c"See docs/design.md (pause points). Off in production.",
        &DEBUG_PAUSE_POINTS,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    unsafe { pg_sys::MarkGUCPrefixReserved(c"ekm".as_ptr()) };
}

/// Where the master key comes from.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum MasterKeySource {
    Command(String),
    File(String),
    DevDefault,
}

fn non_empty(s: &GucSetting<Option<CString>>) -> Option<String> {
    s.get()
        .map(|c| c.to_string_lossy().trim().to_string())
        .filter(|s| !s.is_empty())
}

pub fn master_key_source() -> MasterKeySource {
    if let Some(c) = non_empty(&MASTER_KEY_COMMAND) {
        MasterKeySource::Command(c)
    } else if let Some(f) = non_empty(&MASTER_KEY_FILE) {
        MasterKeySource::File(f)
    } else {
        MasterKeySource::DevDefault
    }
}

pub fn log_redaction() -> bool {
    LOG_REDACTION.get()
}

/// `ekm.batch_search_path`, if set (else a batch uses the table owner's
/// login search_path: `owner::batch_search_path`).
pub fn batch_search_path() -> Option<String> {
    non_empty(&BATCH_SEARCH_PATH)
}

pub fn lock_wait_timeout_ms() -> i32 {
    LOCK_WAIT_TIMEOUT_MS.get()
}

pub fn debug_pause_points() -> bool {
    DEBUG_PAUSE_POINTS.get()
}

pub fn master_key_command_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(MASTER_KEY_COMMAND_TIMEOUT_S.get().max(1) as u64)
}

/// Where the previous master key comes from, during a master key rotation
/// (a command takes precedence over a file, as for the current key).
pub fn previous_master_key_source() -> Option<MasterKeySource> {
    if let Some(c) = non_empty(&PREVIOUS_MASTER_KEY_COMMAND) {
        Some(MasterKeySource::Command(c))
    } else {
        non_empty(&PREVIOUS_MASTER_KEY_FILE).map(MasterKeySource::File)
    }
}

pub fn policy() -> Policy {
    Policy {
        lifetime_days: KEY_LIFETIME_DAYS.get(),
        due_age_days: ROTATION_DUE_AGE_DAYS.get(),
        warning_days: ROTATION_WARNING_DAYS.get(),
        due_encryptions: ROTATION_DUE_ENCRYPTIONS.get(),
    }
}

pub fn rotation_batch_pause() -> std::time::Duration {
    std::time::Duration::from_millis(ROTATION_BATCH_PAUSE_MS.get().max(0) as u64)
}

pub fn rotation_retry_pause() -> std::time::Duration {
    std::time::Duration::from_millis(ROTATION_RETRY_PAUSE_MS.get().max(10) as u64)
}

pub fn rotation_lock_timeout_ms() -> i32 {
    ROTATION_LOCK_TIMEOUT_MS.get()
}

/// `ekm.rotation_vacuum_growth`: the share of a table's size its batches
/// rewrite between two vacuums (0: no vacuum).
pub fn rotation_vacuum_growth() -> f64 {
    ROTATION_VACUUM_GROWTH.get().clamp(0.0, 1.0)
}

/// The throttle's limits: `(max replica lag ms, max active sessions,
/// target application share)`, each 0 when off.
pub fn rotation_throttle() -> (i32, i32, f64) {
    (
        ROTATION_MAX_REPLICA_LAG_MS.get().max(0),
        ROTATION_MAX_ACTIVE_SESSIONS.get().max(0),
        ROTATION_TARGET_APP_SHARE.get().clamp(0.0, 0.99),
    )
}

/// `ekm.rotation_workers`: the workers a job runs at most at once.
pub fn rotation_workers() -> i32 {
    ROTATION_WORKERS.get().max(1)
}

pub fn auto_rotate() -> bool {
    AUTO_ROTATE.get()
}

/// The databases listed in `ekm.auto_rotate_databases` (names, trimmed).
pub fn auto_rotate_databases() -> Vec<String> {
    non_empty(&AUTO_ROTATE_DATABASES)
        .map(|s| {
            s.split(',')
                .map(|d| d.trim().to_string())
                .filter(|d| !d.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

pub fn auto_rotate_naptime() -> std::time::Duration {
    std::time::Duration::from_secs(AUTO_ROTATE_NAPTIME_S.get().max(1) as u64)
}

/// Runs `f` in a GUC nest level of its own (as a function with a SET clause
/// does): settings made inside with [`set_in_nest_level`] are undone when it
/// returns or fails.
pub fn in_nest_level<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(i32);
    impl Drop for Restore {
        fn drop(&mut self) {
            unsafe { pg_sys::AtEOXact_GUC(true, self.0) };
        }
    }
    let _restore = Restore(unsafe { pg_sys::NewGUCNestLevel() });
    f()
}

/// `name = value` in the current GUC nest level (an invalid value raises
/// PostgreSQL's own error).
pub fn set_in_nest_level(name: &std::ffi::CStr, value: &str) {
    let value = CString::new(value).unwrap_or_default();
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
    }
}
