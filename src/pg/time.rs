//! PostgreSQL timestamps and chrono's, both ways.

use chrono::{DateTime, Utc};
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;

const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

pub fn ts_to_chrono(t: TimestampWithTimeZone) -> DateTime<Utc> {
    let pg: i64 = t.into_inner();
    // (+-infinity are i64::MAX / MIN: no overflow, the epoch stands for them)
    pg.checked_add(PG_EPOCH_OFFSET_MICROS)
        .and_then(DateTime::from_timestamp_micros)
        .unwrap_or_default()
}

pub fn chrono_to_ts(t: DateTime<Utc>) -> TimestampWithTimeZone {
    TimestampWithTimeZone::try_from(t.timestamp_micros() - PG_EPOCH_OFFSET_MICROS)
        .expect("timestamp in range")
}

pub fn now() -> DateTime<Utc> {
    ts_to_chrono(unsafe {
        TimestampWithTimeZone::try_from(pg_sys::GetCurrentTransactionStartTimestamp())
            .expect("valid")
    })
}
