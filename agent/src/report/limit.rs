//! The per-app rate limit of alerts, shared by the SNS alerts and the notify sinks.
//!
//! At most `per_window` alerts per app in any `window` (a sliding window); an alert beyond that
//! is held back and counted, and the count is told with the next alert that goes, so a storm
//! becomes a few messages with a number and nothing is silently swallowed. Time is passed in:
//! monotonic time (`clock::mono_now`), so a wall clock stepped back holds nothing back.

use std::collections::{BTreeMap, VecDeque};

/// Per-app sliding-window limit.
#[derive(Debug, Clone)]
pub struct Limiter {
    window_ms: u64,
    per_window: usize,
    /// Per app: when the alerts in the window went, and how many were held back since the last.
    apps: BTreeMap<String, (VecDeque<u64>, u64)>,
}

impl Limiter {
    /// `per_window` is at least 1.
    pub fn new(window_ms: u64, per_window: usize) -> Limiter {
        Limiter {
            window_ms,
            per_window: per_window.max(1),
            apps: BTreeMap::new(),
        }
    }

    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    /// `Some(held back before this one)` when an alert for `app` may go now; `None` when the
    /// window is full (it is counted for the next alert).
    pub fn admit(&mut self, app: &str, now_ms: u64) -> Option<u64> {
        if self.apps.len() >= PRUNE_AT && !self.apps.contains_key(app) {
            self.forget_idle(now_ms);
        }
        let (sent, held) = match self.apps.get_mut(app) {
            Some(x) => x,
            None => self.apps.entry(app.to_string()).or_default(),
        };
        while sent
            .front()
            .is_some_and(|t| now_ms.saturating_sub(*t) >= self.window_ms)
        {
            sent.pop_front();
        }
        if sent.len() >= self.per_window {
            *held += 1;
            return None;
        }
        sent.push_back(now_ms);
        Some(std::mem::take(held))
    }
}

/// Apps tracked before the idle ones are forgotten (an app renamed or removed, a PM2 app
/// name seen once): the map stays the size of the apps alerting now.
const PRUNE_AT: usize = 256;

impl Limiter {
    /// Drops the apps with nothing sent in the window and nothing held back: forgetting them
    /// changes no decision (their next alert goes, telling 0 held back, as it would have).
    fn forget_idle(&mut self, now_ms: u64) {
        let window = self.window_ms;
        self.apps.retain(|_, (sent, held)| {
            *held > 0
                || sent
                    .back()
                    .is_some_and(|t| now_ms.saturating_sub(*t) < window)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_per_app_per_window_and_counts_the_rest() {
        let mut l = Limiter::new(300_000, 1);
        assert_eq!(l.admit("web", 1_000), Some(0));
        assert_eq!(
            l.admit("api", 2_000),
            Some(0),
            "apps are limited separately"
        );
        assert_eq!(l.admit("web", 60_000), None);
        assert_eq!(l.admit("web", 299_999), None);
        assert_eq!(l.admit("web", 301_000), Some(2));
        assert_eq!(l.admit("web", 601_000), Some(0));
    }

    #[test]
    fn a_burst_sends_the_limit_and_the_next_alert_tells_the_rest() {
        let mut l = Limiter::new(60_000, 3);
        let admitted: Vec<Option<u64>> = (0..10).map(|i| l.admit("web", 1_000 + i)).collect();
        assert_eq!(&admitted[..3], &[Some(0), Some(0), Some(0)]);
        assert!(admitted[3..].iter().all(Option::is_none));
        // The window slides: the first slot frees 60 s after the first alert.
        assert_eq!(l.admit("web", 60_999), None);
        assert_eq!(l.admit("web", 61_000), Some(8));
    }

    #[test]
    fn apps_idle_for_a_window_are_forgotten_so_many_app_names_do_not_grow_it() {
        let mut l = Limiter::new(60_000, 1);
        for i in 0..10_000u64 {
            assert_eq!(l.admit(&format!("app{i}"), i * 1_000), Some(0));
        }
        assert!(l.apps.len() <= PRUNE_AT + 60, "{}", l.apps.len());
        // An app with alerts held back is kept until its next alert tells them.
        let mut l = Limiter::new(60_000, 1);
        assert_eq!(l.admit("web", 0), Some(0));
        assert_eq!(l.admit("web", 1), None);
        for i in 0..1_000u64 {
            l.admit(&format!("app{i}"), 120_000 + i);
        }
        assert_eq!(l.admit("web", 200_000), Some(1));
    }
}
