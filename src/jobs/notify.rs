//! Telling listeners a job ended: `NOTIFY ekm_rotation` (the worker also
//! wakes the sessions that sleep in `ekm_rotation_wait`).

use crate::keys::catalog;
use crate::pg::spi::err_text as spi_err;
use pgrx::prelude::*;

/// `NOTIFY ekm_rotation` with the job, its kind and how it ended (JSON).
pub fn notify(job_id: i64, kind: &str, outcome: &str) -> Result<(), String> {
    Spi::run_with_args(
        "SELECT pg_notify('ekm_rotation', $1)",
        &[catalog::json_object(&[
            ("job_id", &job_id.to_string()),
            ("outcome", outcome),
            ("kind", kind),
        ])
        .into()],
    )
    .map_err(spi_err)
}
