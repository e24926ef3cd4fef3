//! Stuck-process detection: one pid's CPU and scheduler state across samples. Pure: the samples
//! come from `ProcWatch`, time is passed in.

use crate::clock::Mono;

use super::cpu_percent;

/// Tracks one pid's CPU and scheduler state across samples to tell when it is stuck.
#[derive(Debug, Clone, PartialEq)]
pub struct PidTracker {
    pub pid: u32,
    pub start_ticks: u64,
    prev: Option<(u64, Mono)>,
    high_since: Option<Mono>,
    halted_since: Option<(char, Mono)>,
    pub cpu_pct: Option<f64>,
}

/// Thresholds for `PidTracker::observe`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StuckRule {
    pub cpu_threshold: f64,
    pub cpu_duration: u64,
    /// A pid stopped (T) or in uninterruptible sleep (D) longer than this is stuck.
    pub halt_window: u64,
    pub ticks_per_sec: u64,
}

impl PidTracker {
    pub fn new(pid: u32, start_ticks: u64) -> PidTracker {
        PidTracker {
            pid,
            start_ticks,
            prev: None,
            high_since: None,
            halted_since: None,
            cpu_pct: None,
        }
    }

    /// Feeds one sample taken at `now`; returns why the pid is stuck, if it is.
    pub fn observe(
        &mut self,
        state: char,
        cpu_ticks: u64,
        now: Mono,
        rule: &StuckRule,
    ) -> Option<String> {
        if let Some((ticks, at)) = self.prev {
            let pct = cpu_percent(ticks, cpu_ticks, now.saturating_sub(at), rule.ticks_per_sec);
            self.cpu_pct = Some(pct);
            if pct >= rule.cpu_threshold {
                // The busy stretch began at the previous sample.
                self.high_since.get_or_insert(at);
            } else {
                self.high_since = None;
            }
        }
        self.prev = Some((cpu_ticks, now));
        match (state, self.halted_since) {
            ('T' | 'D', Some((s, _))) if s == state => {}
            ('T' | 'D', _) => self.halted_since = Some((state, now)),
            _ => self.halted_since = None,
        }
        if let Some((s, since)) = self.halted_since {
            let held = now.saturating_sub(since);
            if held >= rule.halt_window {
                let what = if s == 'T' {
                    "stopped (state T)"
                } else {
                    "in uninterruptible sleep (state D)"
                };
                return Some(format!("{what} for {held} ms"));
            }
        }
        if let Some(since) = self.high_since {
            let held = now.saturating_sub(since);
            if held >= rule.cpu_duration {
                return Some(format!(
                    "CPU {:.0}% >= {}% for {held} ms",
                    self.cpu_pct.unwrap_or(0.0),
                    rule.cpu_threshold
                ));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_tracker_finds_spin_and_stop() {
        let rule = StuckRule {
            cpu_threshold: 90.0,
            cpu_duration: 3_000,
            halt_window: 1_000,
            ticks_per_sec: 100,
        };
        let mut t = PidTracker::new(7, 1);
        assert_eq!(t.observe('R', 0, 0, &rule), None);
        assert_eq!(t.observe('R', 100, 1_000, &rule), None); // 100% since 0
        assert_eq!(t.observe('R', 200, 2_000, &rule), None);
        let stuck = t.observe('R', 300, 3_000, &rule).unwrap();
        assert!(stuck.starts_with("CPU 100% >= 90% for 3000 ms"), "{stuck}");
        // A dip resets it.
        assert_eq!(t.observe('S', 310, 4_000, &rule), None);
        assert_eq!(t.observe('R', 410, 5_000, &rule), None);
        // Stopped: stuck once held for the halt window.
        assert_eq!(t.observe('T', 410, 6_000, &rule), None);
        assert_eq!(t.observe('T', 410, 6_999, &rule), None);
        assert!(t
            .observe('T', 410, 7_000, &rule)
            .unwrap()
            .starts_with("stopped (state T)"));
        assert_eq!(t.observe('S', 410, 8_000, &rule), None);
    }
}
