//! ekm: field encryption with managed keys and online key rotation.
//! The crypto, format and lifecycle rules live in `ekm-core`; this crate is
//! the PostgreSQL glue, in four layers, each using only those below it
//! (docs/design.md, "Layout"):
//!
//! * `sql`  — the SQL surface: `#[pg_extern]` functions and the per-row path
//! * `jobs` — rotation, rollback, encryption and scan jobs: protocol steps,
//!   the worker and the launcher
//! * `keys` — key custody: ekm's tables, master key, key cache, counters,
//!   ekm's locks, the key lifecycle
//! * `pg`   — PostgreSQL support: SPI, acting as an owner, errors and the
//!   log, settings

// pgrx's TableIterator signatures (named result columns) are long by nature.
#![allow(clippy::type_complexity)]

use pgrx::prelude::*;

mod jobs;
mod keys;
mod pg;
mod sql;

::pgrx::pg_module_magic!(name, version);

pgrx::extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
pgrx::extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        pg::error::raise_with(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "ekm must be loaded at server start".into(),
            Some(
                "add ekm to shared_preload_libraries in postgresql.conf and restart the server"
                    .into(),
            ),
        );
    }
    pg::gucs::init();
    keys::shmem::init();
    pg::error::init();
    keys::keycache::init();
    keys::masterkey::startup();
    jobs::worker::register_launcher();
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn one(q: &str) -> Option<String> {
        Spi::get_one::<String>(q).expect("query runs")
    }

    #[pg_test]
    fn round_trip_with_and_without_context() {
        assert_eq!(
            one("SELECT ekm_decrypt(ekm_encrypt('alice@example.com'))").as_deref(),
            Some("alice@example.com")
        );
        assert_eq!(one("SELECT ekm_decrypt(ekm_encrypt('x', 'public.people.email'), 'public.people.email')").as_deref(), Some("x"));
        assert_eq!(
            one("SELECT ekm_decrypt(ekm_encrypt(''))").as_deref(),
            Some("")
        );
        assert_eq!(one("SELECT ekm_decrypt(NULL)"), None);
    }

    #[pg_test]
    fn ciphertext_names_the_active_key_and_is_compact() {
        let active = one("SELECT key_id FROM ekm.keys WHERE is_active").expect("one active key");
        let ct = one("SELECT ekm_encrypt('alice.smith@example.co.uk')").unwrap();
        assert!(ct.starts_with("ekm1:"));
        assert!(ct.len() <= 93, "{} chars", ct.len());
        let named =
            Spi::get_one_with_args::<String>("SELECT ekm_key_id($1)", &[ct.as_str().into()])
                .unwrap();
        assert_eq!(named.as_deref(), Some(active.as_str()));
    }

    #[pg_test]
    fn activation_switches_encryption_and_keeps_old_values_readable() {
        let ct = one("SELECT ekm_encrypt('before')").unwrap();
        let k2 = one("SELECT ekm_create_key()").unwrap();
        Spi::run_with_args("SELECT ekm_activate_key($1)", &[k2.as_str().into()]).unwrap();
        assert_eq!(
            one("SELECT ekm_key_id(ekm_encrypt('after'))").as_deref(),
            Some(k2.as_str())
        );
        let back =
            Spi::get_one_with_args::<String>("SELECT ekm_decrypt($1)", &[ct.as_str().into()])
                .unwrap();
        assert_eq!(back.as_deref(), Some("before"));
        let states =
            one("SELECT string_agg(rotation_status, ',' ORDER BY rotation_status) FROM ekm.keys");
        assert_eq!(states.as_deref(), Some("active,rotating"));
    }

    /// The SQLSTATE and message of the error `q` raises.
    fn error_of(q: &str) -> (PgSqlErrorCode, String) {
        PgTryBuilder::new(|| {
            Spi::run(q).expect("query runs");
            (PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION, String::new())
        })
        .catch_others(|e| match e {
            pg_sys::panic::CaughtError::PostgresError(r)
            | pg_sys::panic::CaughtError::ErrorReport(r) => {
                (r.sql_error_code(), r.message().to_string())
            }
            other => other.rethrow(),
        })
        .execute()
    }

    #[pg_test]
    fn wrong_context_is_an_error_naming_the_cause() {
        let (code, msg) = error_of(
            "SELECT ekm_decrypt(ekm_encrypt('x', 'public.people.email'), 'public.people.mobno')",
        );
        assert_eq!(code, PgSqlErrorCode::ERRCODE_DATA_CORRUPTED);
        assert!(
            msg.contains("the context does not match, or the value was altered"),
            "{msg}"
        );
        assert!(
            !msg.contains("public.people"),
            "the message names no data: {msg}"
        );
    }

    #[pg_test(error = "value is not an ekm ciphertext")]
    fn plaintext_is_not_a_ciphertext() {
        one("SELECT ekm_decrypt('alice@example.com')");
    }

    #[pg_test(error = "ekm ciphertext is truncated or malformed (too short)")]
    fn truncated_is_an_error() {
        one("SELECT ekm_decrypt(left(ekm_encrypt('x'), 20))");
    }

    #[pg_test(error = "key key_20200101_000000_0000 does not exist in this database")]
    fn unknown_key_is_an_error() {
        one("SELECT ekm_activate_key('key_20200101_000000_0000')");
    }

    #[pg_test]
    fn status_reports_one_active_key() {
        let r = Spi::get_two::<i64, i64>(
            "SELECT active_keys_count, keys_needing_rotation FROM ekm_key_status()",
        )
        .unwrap();
        assert_eq!(r, (Some(1), Some(0)));
    }
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'ekm'"]
    }
}
