//! How fast a rotation may go: the vacuum cadence that bounds a table's
//! growth, and the adaptive pause that keeps the application's throughput
//! at a target share (docs/design.md, section 5, "Pace"). Pure arithmetic:
//! the worker feeds it clock readings and counters.

/// After how many batches of `blocks_per_batch` blocks the worker vacuums a
/// table of `table_blocks` blocks, for its batches to rewrite at most
/// `growth` of the table between two vacuums (`ekm.rotation_vacuum_growth`).
/// `None`: no vacuum (`growth` is 0). Never less than one batch.
///
/// A table whose pages are full grows by what its batches rewrite until a
/// vacuum frees the old row versions; later batches then reuse that space.
/// So the table grows by about `growth` of its size, and the number of
/// vacuums is about `1 / growth` whatever the table's size.
pub fn vacuum_every(table_blocks: i64, blocks_per_batch: i64, growth: f64) -> Option<u32> {
    if growth.is_nan() || growth <= 0.0 {
        return None;
    }
    let budget = (table_blocks.max(0) as f64) * growth.min(1.0);
    let batches = (budget / blocks_per_batch.max(1) as f64).floor();
    Some(batches.clamp(1.0, u32::MAX as f64) as u32)
}

/// The blocks one batch covers: `blocks_per_batch` (from the job's batch
/// size), but no more than `growth` of the table while vacuums bound its
/// growth. In a table of a few batches one batch would rewrite a fifth of
/// it (and of its TOAST) before any vacuum could free a byte.
pub fn batch_blocks(blocks_per_batch: i64, table_blocks: i64, growth: f64) -> i64 {
    let bpb = blocks_per_batch.max(1);
    if growth.is_nan() || growth <= 0.0 {
        return bpb;
    }
    let cap = ((table_blocks.max(0) as f64) * growth.min(1.0)).floor() as i64;
    bpb.min(cap.max(1))
}

/// A range of one table's pass is split between two workers only when at
/// least this many batches are left in it for each of them.
pub const SPLIT_MIN_BATCHES: i64 = 4;

/// Where to split the part of a pass that a worker is working on, blocks
/// `next` (its next batch starts there) to `end`, for a second worker to take
/// `[split, end)` (`ekm.rotation_workers`): the middle, if each half has at
/// least [`SPLIT_MIN_BATCHES`] batches of `blocks_per_batch` blocks. The
/// first worker may be in the middle of a batch from `next` (and, its
/// bookkeeping committing while the split waits for it, of the next one):
/// the split point is always at least two whole batches past `next`, so
/// neither batch crosses it.
pub fn split_point(next: i64, end: i64, blocks_per_batch: i64) -> Option<i64> {
    let bpb = blocks_per_batch.max(1);
    let left = end - next;
    if left < 2 * SPLIT_MIN_BATCHES * bpb {
        return None;
    }
    let split = next + left / 2;
    debug_assert!(split >= next + 2 * bpb && split < end);
    Some(split)
}

/// Window lengths of the adaptive pause (milliseconds).
pub const REST_MS: u64 = 1_000;
pub const WORK_MS: u64 = 4_000;
/// While the share stays well above the target with no pause, each work
/// window is twice the last, up to this: the rests cost less of the
/// rotation's time when the application does not need them.
pub const MAX_WORK_MS: u64 = 16_000;
/// Below this many application transactions per second while the
/// rotation rests, there is no application to protect (autovacuum's
/// ANALYZE and the like take a few): full speed, and the next rest comes
/// after a longer work window.
pub const IDLE_RATE: f64 = 20.0;
pub const IDLE_WORK_MS: u64 = 30_000;
/// The longest pause it sets after a batch, per unit of the batch's own
/// time (50: the batches run 2% of the time).
pub const MAX_RATIO: f64 = 50.0;

/// What the worker does next under `ekm.rotation_target_app_share`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// Run no batch for this long: the application's throughput without
    /// the rotation is being measured.
    Rest { ms: u64 },
    /// Run batches, pausing after each `ratio` times as long as it took (a
    /// batch of a later pass that finds little to move costs little, and
    /// is paused for little).
    Work { ratio: f64 },
}

#[derive(Debug, Clone, Copy)]
enum Window {
    None,
    Rest {
        start_ms: u64,
        count: u64,
    },
    Work {
        start_ms: u64,
        count: u64,
        len_ms: u64,
    },
}

/// An additive-increase/multiplicative-decrease controller of the pause
/// after each batch, as a ratio of the batch's own time (the rotation's
/// duty cycle). It alternates a rest window (no batches: the
/// application's rate alone) and a work window (batches with the current
/// pause), compares the application's rate in the two, and lengthens the
/// pause when the share is below the target (doubles it, at least +0.5,
/// when it is more than 15 points below; +30%, at least +0.1, otherwise:
/// the application comes first), shortens it when it is well above (by a
/// sixth: the rotation creeps back).
///
/// The counter it is fed is the number of the application's transactions
/// so far (any monotone count; the worker uses transaction ids handed out
/// minus its own).
#[derive(Debug, Clone)]
pub struct ShareController {
    target: f64,
    ratio: f64,
    work_ms: u64,
    window: Window,
    /// the last measured application rates (per second): without, with
    pub last_rest_rate: Option<f64>,
    pub last_share: Option<f64>,
}

impl ShareController {
    pub fn new(target: f64) -> Self {
        ShareController {
            target: target.clamp(0.0, 0.99),
            ratio: 0.0,
            work_ms: WORK_MS,
            window: Window::None,
            last_rest_rate: None,
            last_share: None,
        }
    }

    pub fn target(&self) -> f64 {
        self.target
    }

    /// A new target keeps the pause and the windows.
    pub fn set_target(&mut self, target: f64) {
        self.target = target.clamp(0.0, 0.99);
    }

    /// The pause after a batch, per unit of its own time.
    pub fn ratio(&self) -> f64 {
        self.ratio
    }

    /// What to do now, at `now_ms`, with `count` application transactions
    /// so far.
    pub fn next(&mut self, now_ms: u64, count: u64) -> Pace {
        match self.window {
            Window::None => {
                self.window = Window::Rest {
                    start_ms: now_ms,
                    count,
                };
                Pace::Rest { ms: REST_MS }
            }
            Window::Rest {
                start_ms,
                count: c0,
            } => {
                let elapsed = now_ms.saturating_sub(start_ms);
                if elapsed < REST_MS {
                    return Pace::Rest {
                        ms: REST_MS - elapsed,
                    };
                }
                let rate = per_second(count.saturating_sub(c0), elapsed);
                self.last_rest_rate = Some(rate);
                let len_ms = if rate < IDLE_RATE {
                    // no application to protect: full speed
                    self.ratio = 0.0;
                    self.last_share = None;
                    IDLE_WORK_MS
                } else {
                    self.work_ms
                };
                self.window = Window::Work {
                    start_ms: now_ms,
                    count,
                    len_ms,
                };
                Pace::Work { ratio: self.ratio }
            }
            Window::Work {
                start_ms,
                count: c0,
                len_ms,
            } => {
                let elapsed = now_ms.saturating_sub(start_ms);
                if elapsed < len_ms {
                    return Pace::Work { ratio: self.ratio };
                }
                let rate = per_second(count.saturating_sub(c0), elapsed);
                if let Some(rest) = self.last_rest_rate.filter(|r| *r >= IDLE_RATE) {
                    let share = rate / rest;
                    self.last_share = Some(share);
                    self.adjust(share);
                }
                self.window = Window::Rest {
                    start_ms: now_ms,
                    count,
                };
                Pace::Rest { ms: REST_MS }
            }
        }
    }

    fn adjust(&mut self, share: f64) {
        let comfortable = share > self.target + 0.05;
        if share < self.target - 0.15 {
            // far below: the application comes first
            self.ratio = (self.ratio * 2.0).max(self.ratio + 0.5);
        } else if share < self.target {
            self.ratio = (self.ratio * 1.3).max(self.ratio + 0.1);
        } else if comfortable {
            self.ratio = self.ratio * 5.0 / 6.0 - 0.05;
        }
        self.ratio = self.ratio.clamp(0.0, MAX_RATIO);
        self.work_ms = if comfortable && self.ratio == 0.0 {
            (self.work_ms * 2).min(MAX_WORK_MS)
        } else {
            WORK_MS
        };
    }
}

fn per_second(n: u64, ms: u64) -> f64 {
    n as f64 * 1000.0 / ms.max(1) as f64
}

#[cfg(test)]
mod tests {
    #[test]
    fn split_point_halves_what_is_left_past_two_batches() {
        // too little left: no split
        assert_eq!(split_point(0, 7, 1), None);
        assert_eq!(split_point(100, 100 + 8 * 10 - 1, 10), None);
        assert_eq!(split_point(100, 100, 10), None);
        assert_eq!(split_point(100, 50, 10), None);
        // the middle
        assert_eq!(split_point(0, 8, 1), Some(4));
        assert_eq!(split_point(100, 180, 10), Some(140));
        assert_eq!(split_point(0, 1_000_001, 64), Some(500_000));
        // always two whole batches past next, and short of the end
        for bpb in [1i64, 2, 3, 7, 64, 1000] {
            for next in [0i64, 5, 999] {
                for left in 0..(40 * bpb) {
                    if let Some(s) = split_point(next, next + left, bpb) {
                        assert!(
                            s >= next + 2 * bpb && s < next + left,
                            "{next} {left} {bpb} {s}"
                        );
                        assert!(next + left - s >= SPLIT_MIN_BATCHES * bpb);
                    }
                }
            }
        }
        // a batch size of 0 counts as 1
        assert_eq!(split_point(0, 8, 0), Some(4));
    }

    use super::*;

    #[test]
    fn cadence_follows_the_table_size() {
        // 200,000 rows of ~235 bytes: ~5,700 blocks, batches of ~29 blocks
        assert_eq!(vacuum_every(5_700, 29, 0.02), Some(3));
        // ten times the table: ten times the batches between vacuums
        assert_eq!(vacuum_every(57_000, 29, 0.02), Some(39));
        // a small table: every batch
        assert_eq!(vacuum_every(40, 29, 0.02), Some(1));
        assert_eq!(vacuum_every(0, 0, 0.02), Some(1));
        // off
        assert_eq!(vacuum_every(5_700, 29, 0.0), None);
        assert_eq!(vacuum_every(5_700, 29, f64::NAN), None);
        // the whole table between two vacuums
        assert_eq!(vacuum_every(5_700, 29, 1.0), Some(196));
    }

    #[test]
    fn batches_of_a_small_table_stay_small() {
        // 200,000 rows: the job's batch size decides
        assert_eq!(batch_blocks(29, 5_700, 0.02), 29);
        // 5,000 rows with TOASTed values in 32 blocks: one block at a time
        assert_eq!(batch_blocks(32, 32, 0.02), 1);
        assert_eq!(batch_blocks(10, 600, 0.02), 10);
        assert_eq!(batch_blocks(29, 600, 0.02), 12);
        // no vacuum: no cap
        assert_eq!(batch_blocks(32, 32, 0.0), 32);
        assert_eq!(batch_blocks(0, 0, 0.02), 1);
    }

    #[test]
    fn vacuums_per_pass_do_not_grow_with_the_table() {
        for blocks in [10_000i64, 100_000, 1_000_000, 100_000_000] {
            let every = vacuum_every(blocks, 30, 0.02).unwrap() as i64;
            let batches = blocks / 30;
            let vacuums = batches / every;
            assert!((45..=56).contains(&vacuums), "{blocks}: {vacuums}");
        }
    }

    /// A simulated application whose rate falls with the rotation's duty
    /// cycle (work / (work + pause)): the controller settles where the
    /// share is at the target, from above.
    fn simulate(target: f64, batch_ms: f64, slowdown: f64) -> (ShareController, f64) {
        let mut c = ShareController::new(target);
        let base = 3_000.0; // transactions per second without the rotation
        let (mut now, mut count) = (0u64, 0f64);
        let mut share_seen = 0.0;
        for _ in 0..20_000 {
            match c.next(now, count as u64) {
                Pace::Rest { ms } => {
                    now += ms;
                    count += base * ms as f64 / 1000.0;
                }
                Pace::Work { ratio } => {
                    let step = batch_ms * (1.0 + ratio);
                    let duty = batch_ms / step;
                    let rate = base * (1.0 - slowdown * duty);
                    share_seen = rate / base;
                    now += step as u64;
                    count += rate * step / 1000.0;
                }
            }
        }
        (c, share_seen)
    }

    #[test]
    fn settles_at_the_target() {
        // full speed costs the application 53% (the measurement)
        let (c, share) = simulate(0.8, 20.0, 0.53);
        assert!((0.78..=0.9).contains(&share), "share {share}");
        assert!(c.ratio() > 0.0);
        let (_, share) = simulate(0.5, 20.0, 0.53);
        assert!(share >= 0.48, "share {share}");
    }

    #[test]
    fn no_pause_when_the_target_holds_at_full_speed() {
        let (c, share) = simulate(0.8, 20.0, 0.1);
        assert_eq!(c.ratio(), 0.0);
        assert!(share >= 0.89);
    }

    #[test]
    fn an_idle_server_gets_full_speed_and_rare_rests() {
        let mut c = ShareController::new(0.8);
        assert_eq!(c.next(0, 0), Pace::Rest { ms: REST_MS });
        assert_eq!(c.next(REST_MS, 2), Pace::Work { ratio: 0.0 });
        // stays working for the long idle window
        assert_eq!(c.next(REST_MS + WORK_MS + 1, 3), Pace::Work { ratio: 0.0 });
        assert_eq!(
            c.next(REST_MS + IDLE_WORK_MS, 3),
            Pace::Rest { ms: REST_MS }
        );
        assert_eq!(c.last_share, None);
    }

    #[test]
    fn rests_grow_rare_while_the_application_does_not_need_them() {
        let mut c = ShareController::new(0.8);
        let (mut now, mut count) = (0u64, 0u64);
        let mut works = Vec::new();
        for _ in 0..10 {
            // rest: 100 transactions per second; work: the same
            assert_eq!(c.next(now, count), Pace::Rest { ms: REST_MS });
            now += REST_MS;
            count += 100;
            let start = now;
            assert_eq!(c.next(now, count), Pace::Work { ratio: 0.0 });
            loop {
                now += 10;
                count += 1;
                if c.next(now, count) != (Pace::Work { ratio: 0.0 }) {
                    break;
                }
            }
            works.push(now - start);
            // (the answer that ended the loop opened the next rest window)
            c.window = Window::None;
        }
        assert_eq!(works[0], WORK_MS);
        assert_eq!(works[1], 2 * WORK_MS);
        assert_eq!(*works.last().unwrap(), MAX_WORK_MS);
    }

    #[test]
    fn the_pause_is_bounded() {
        let mut c = ShareController::new(0.99);
        let mut now = 0;
        let mut count = 0;
        for _ in 0..100_000 {
            match c.next(now, count) {
                Pace::Rest { ms } => {
                    now += ms;
                    count += ms * 10;
                }
                Pace::Work { ratio } => {
                    now += (10.0 * (1.0 + ratio)) as u64;
                    // the application is stalled whatever the pause
                }
            }
        }
        assert_eq!(c.ratio(), MAX_RATIO);
    }
}
