//! The close pacer: how many connections may be told to leave by now. Pure, time passed in.
//!
//! Closes are spaced `1/rate` apart, each gap stretched by a random factor in
//! `[1, 1 + jitter)`, so the pacer never exceeds the rate and clients that reconnect do not
//! do it in lockstep. A late caller gets little backlog: at most `max_burst` closes per call,
//! and at most `max(gap, 50 ms)` worth of missed slots, so any one-second window holds at
//! most `1.05 * rate + 1` closes however irregularly the pacer is polled.

use std::time::{Duration, Instant};

const CATCH_UP: Duration = Duration::from_millis(50);

#[derive(Debug, Clone)]
pub struct ClosePacer {
    /// None: unlimited (close rate 0).
    gap: Option<Duration>,
    jitter: f64,
    max_burst: usize,
    next: Option<Instant>,
}

impl ClosePacer {
    /// `rate`: closes per second (0 = unlimited). `jitter` in `[0, 1]`.
    pub fn new(rate: u32, jitter: f64) -> Self {
        let gap = if rate == 0 {
            None
        } else {
            Some(Duration::from_secs_f64(1.0 / f64::from(rate)))
        };
        ClosePacer {
            gap,
            jitter: jitter.clamp(0.0, 1.0),
            max_burst: 64,
            next: None,
        }
    }

    fn stretched(&self, gap: Duration, u: f64) -> Duration {
        gap.mul_f64(1.0 + self.jitter * u.clamp(0.0, 1.0))
    }

    /// Number of closes allowed at `now`. `uniform` yields samples in `[0, 1)`.
    pub fn permits(&mut self, now: Instant, uniform: &mut dyn FnMut() -> f64) -> usize {
        let Some(gap) = self.gap else {
            return usize::MAX;
        };
        let mut next = match self.next {
            None => now,
            // Caller was late: keep at most `catch_up` worth of missed slots.
            Some(n) => {
                let catch_up = gap.max(CATCH_UP);
                match now.checked_sub(catch_up) {
                    Some(floor) if n < floor => floor,
                    _ => n,
                }
            }
        };
        let mut n = 0;
        while next <= now && n < self.max_burst {
            n += 1;
            next += self.stretched(gap, uniform());
        }
        self.next = Some(next);
        n
    }

    /// When the next close becomes allowed (None: unlimited or never started).
    pub fn next_at(&self) -> Option<Instant> {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zero() -> impl FnMut() -> f64 {
        || 0.0
    }

    #[test]
    fn first_close_is_immediate() {
        let t0 = Instant::now();
        let mut p = ClosePacer::new(10, 0.0);
        assert_eq!(p.permits(t0, &mut zero()), 1);
        assert_eq!(p.permits(t0, &mut zero()), 0);
        assert_eq!(p.next_at(), Some(t0 + Duration::from_millis(100)));
    }

    #[test]
    fn steady_rate_without_jitter() {
        let t0 = Instant::now();
        let mut p = ClosePacer::new(100, 0.0);
        let mut total = 0;
        // Poll every millisecond for one second.
        for ms in 0..1000u64 {
            total += p.permits(t0 + Duration::from_millis(ms), &mut zero());
        }
        assert!((99..=100).contains(&total), "total {total}");
    }

    #[test]
    fn jitter_only_slows_down() {
        let t0 = Instant::now();
        let mut p = ClosePacer::new(100, 0.5);
        let mut u = 0.0f64;
        let mut uniform = move || {
            u = (u + 0.37) % 1.0;
            u
        };
        let mut total = 0;
        for ms in 0..1000u64 {
            total += p.permits(t0 + Duration::from_millis(ms), &mut uniform);
        }
        assert!(total <= 101, "total {total}");
        assert!(total >= 60, "total {total}");
    }

    #[test]
    fn never_more_than_rate_plus_one_in_any_window_even_when_polled_late() {
        let t0 = Instant::now();
        let mut p = ClosePacer::new(50, 0.2);
        let mut events = Vec::new();
        let mut ms = 0u64;
        // Irregular polling: sometimes late by up to 300 ms.
        let mut k = 0u64;
        while ms < 5000 {
            let n = p.permits(t0 + Duration::from_millis(ms), &mut || 0.5);
            for _ in 0..n {
                events.push(ms);
            }
            k += 1;
            ms += if k.is_multiple_of(7) { 300 } else { 3 };
        }
        for &start in &events {
            let in_window = events
                .iter()
                .filter(|&&e| e >= start && e < start + 1000)
                .count();
            assert!(in_window <= 54, "window at {start}: {in_window}");
        }
    }

    #[test]
    fn late_caller_gets_no_backlog() {
        let t0 = Instant::now();
        let mut p = ClosePacer::new(10, 0.0);
        assert_eq!(p.permits(t0, &mut zero()), 1);
        // Ten seconds late: at most one gap of backlog, not a hundred closes.
        assert!(p.permits(t0 + Duration::from_secs(10), &mut zero()) <= 2);
    }

    #[test]
    fn slightly_late_caller_catches_up_within_a_gap() {
        let t0 = Instant::now();
        let mut p = ClosePacer::new(10, 0.0);
        assert_eq!(p.permits(t0, &mut zero()), 1);
        // 150 ms later: the 100 ms slot is due (and not more).
        assert_eq!(p.permits(t0 + Duration::from_millis(150), &mut zero()), 1);
        assert_eq!(p.permits(t0 + Duration::from_millis(199), &mut zero()), 0);
        assert_eq!(p.permits(t0 + Duration::from_millis(200), &mut zero()), 1);
    }

    #[test]
    fn unlimited_rate() {
        let t0 = Instant::now();
        let mut p = ClosePacer::new(0, 0.5);
        assert_eq!(p.permits(t0, &mut zero()), usize::MAX);
        assert_eq!(p.next_at(), None);
    }

    #[test]
    fn jitter_is_clamped() {
        let t0 = Instant::now();
        let mut p = ClosePacer::new(1, 7.0);
        assert_eq!(p.permits(t0, &mut || 1.0), 1);
        // gap stretched at most 2x.
        assert_eq!(p.next_at(), Some(t0 + Duration::from_secs(2)));
    }

    #[test]
    fn very_high_rate_is_bounded_per_call() {
        let t0 = Instant::now();
        let mut p = ClosePacer::new(1_000_000, 0.0);
        assert_eq!(p.permits(t0, &mut zero()), 1);
        let n = p.permits(t0 + Duration::from_micros(500), &mut zero());
        assert!(n <= 64, "{n}");
    }
}
