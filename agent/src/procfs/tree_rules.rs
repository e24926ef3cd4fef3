//! The rules judged over an app's process trees (see `tree`): the RSS of all the app's trees
//! above `memory_limit` for `memory_duration`, and with `cpu_scope = "tree"` each tree's summed
//! CPU at or above `cpu_threshold` for `cpu_duration`. Pure: the members come from `tree::walk`,
//! time is passed in (`Mono`, CLOCK_BOOTTIME ms: the clock process start times count in too).

use std::collections::BTreeMap;

use crate::clock::Mono;
use crate::config::bytes::ByteSize;

use super::tree::Member;

/// Thresholds for `TreeWatch::observe`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TreeRule {
    pub memory_limit: Option<ByteSize>,
    pub memory_duration: u64,
    /// `None`: CPU is judged per process (`PidTracker`), not here.
    pub cpu_threshold: Option<f64>,
    pub cpu_duration: u64,
    pub ticks_per_sec: u64,
}

/// One PM2 process's tree, sampled at one check.
#[derive(Debug, Clone, PartialEq)]
pub struct RootSample {
    pub pm_id: u32,
    pub pid: u32,
    /// The root first (`tree::walk`); empty when the root is gone.
    pub members: Vec<Member>,
}

/// A tree rule broken: `pm_ids` at fault (empty = the whole app).
#[derive(Debug, Clone, PartialEq)]
pub struct TreeFinding {
    pub reason: String,
    pub pm_ids: Vec<u32>,
}

/// What the last sample of one tree said.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TreeTotals {
    pub processes: usize,
    pub rss_bytes: u64,
    /// % of one core since the previous sample; `None` on the first.
    pub cpu_pct: Option<f64>,
}

/// When a condition began to hold without a break.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Since(Option<Mono>);

impl Since {
    /// Notes whether the condition holds (it began at `from` if new); how long it has held.
    fn hold(&mut self, holds: bool, from: Mono, now: Mono) -> Option<u64> {
        if !holds {
            self.0 = None;
            return None;
        }
        Some(now.saturating_sub(*self.0.get_or_insert(from)))
    }
}

/// Each member's (start ticks, CPU ticks), by pid.
type Ticks = BTreeMap<u32, (u64, u64)>;

#[derive(Debug, Clone, PartialEq)]
struct RootState {
    start_ticks: u64,
    /// The previous sample: when, and each member's (start ticks, CPU ticks).
    prev: Option<(Mono, Ticks)>,
    busy: Since,
    totals: TreeTotals,
}

/// The tree rules' memory across checks, for one app.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TreeWatch {
    roots: BTreeMap<u32, RootState>,
    over_memory: Since,
    /// The last sample's time and findings, repeated by the checks between two samples.
    sampled_at: Option<Mono>,
    found: Vec<TreeFinding>,
}

/// The longest time between two samples of the trees: a tree costs ~100 us of CPU per app and
/// check (BENCHMARKS.md), 1.2 % of a core at 100 apps every second, so trees are sampled at
/// most every quarter of the shortest rule's duration, and at least every 5 s.
pub const MAX_SAMPLE_PERIOD: u64 = 5_000;

impl TreeRule {
    /// How long a tree sample stands for (see `MAX_SAMPLE_PERIOD`).
    pub fn sample_period(&self) -> u64 {
        let memory = self.memory_limit.map(|_| self.memory_duration);
        let cpu = self.cpu_threshold.map(|_| self.cpu_duration);
        memory
            .into_iter()
            .chain(cpu)
            .map(|d| d / 4)
            .min()
            .unwrap_or(0)
            .min(MAX_SAMPLE_PERIOD)
    }
}

impl TreeWatch {
    /// Whether the last sample is older than the rule's sample period.
    pub fn due(&self, now: Mono, rule: &TreeRule) -> bool {
        self.sampled_at
            .is_none_or(|at| now.saturating_sub(at) >= rule.sample_period())
    }

    /// The rules the last sample broke.
    pub fn last_found(&self) -> &[TreeFinding] {
        &self.found
    }

    /// Feeds one check's trees, sampled at `now`; returns the rules they break.
    pub fn observe(
        &mut self,
        trees: &[RootSample],
        now: Mono,
        rule: &TreeRule,
    ) -> Vec<TreeFinding> {
        self.roots
            .retain(|pid, _| trees.iter().any(|t| t.pid == *pid));
        let mut found = Vec::new();
        for t in trees {
            let Some(root) = t.members.first() else {
                self.roots.remove(&t.pid);
                continue;
            };
            let state = self
                .roots
                .entry(t.pid)
                .and_modify(|s| {
                    if s.start_ticks != root.start_ticks {
                        *s = RootState::new(root.start_ticks);
                    }
                })
                .or_insert_with(|| RootState::new(root.start_ticks));
            if let Some(why) = state.observe(&t.members, now, rule) {
                found.push(TreeFinding {
                    reason: format!("pm_id {} pid {}: {why}", t.pm_id, t.pid),
                    pm_ids: vec![t.pm_id],
                });
            }
        }
        if let Some(why) = self.memory(now, rule) {
            found.insert(
                0,
                TreeFinding {
                    reason: why,
                    pm_ids: Vec::new(),
                },
            );
        }
        self.sampled_at = Some(now);
        self.found.clone_from(&found);
        found
    }

    /// The app's RSS (every tree) over the limit for the whole duration, as a reason.
    fn memory(&mut self, now: Mono, rule: &TreeRule) -> Option<String> {
        let limit = rule.memory_limit?;
        let rss = self.rss_bytes()?;
        let held = self.over_memory.hold(rss > limit.bytes, now, now)?;
        (held >= rule.memory_duration).then(|| {
            format!(
                "memory {} > {} for {:.1} s (tree of {} processes)",
                limit.show(rss),
                limit,
                held as f64 / 1000.0,
                self.processes()
            )
        })
    }

    /// The RSS of every tree together, once one was sampled.
    pub fn rss_bytes(&self) -> Option<u64> {
        (!self.roots.is_empty()).then(|| self.roots.values().map(|r| r.totals.rss_bytes).sum())
    }

    /// The processes of every tree together.
    pub fn processes(&self) -> usize {
        self.roots.values().map(|r| r.totals.processes).sum()
    }

    /// The last totals of the tree rooted at `pid`.
    pub fn totals(&self, pid: u32) -> Option<TreeTotals> {
        self.roots.get(&pid).map(|r| r.totals)
    }
}

impl RootState {
    fn new(start_ticks: u64) -> RootState {
        RootState {
            start_ticks,
            prev: None,
            busy: Since::default(),
            totals: TreeTotals {
                processes: 0,
                rss_bytes: 0,
                cpu_pct: None,
            },
        }
    }

    fn observe(&mut self, members: &[Member], now: Mono, rule: &TreeRule) -> Option<String> {
        let ticks: Ticks = members
            .iter()
            .map(|m| (m.pid, (m.start_ticks, m.cpu_ticks)))
            .collect();
        let cpu = self.prev.as_ref().map(|(at, prev)| {
            (
                *at,
                tree_cpu_percent(prev, members, *at, now, rule.ticks_per_sec),
            )
        });
        self.prev = Some((now, ticks));
        self.totals = TreeTotals {
            processes: members.len(),
            rss_bytes: members.iter().map(|m| m.rss_bytes).sum(),
            cpu_pct: cpu.map(|(_, pct)| pct),
        };
        let threshold = rule.cpu_threshold?;
        let (at, pct) = cpu?;
        // The busy stretch began at the previous sample, as for one process.
        let held = self.busy.hold(pct >= threshold, at, now)?;
        (held >= rule.cpu_duration).then(|| {
            format!(
                "tree CPU {pct:.0}% >= {threshold}% for {held} ms (tree of {} processes)",
                members.len()
            )
        })
    }
}

/// The tree's CPU between two samples, in % of one core: each member's ticks since the previous
/// sample; a member started since then counts all its ticks, one that existed unseen counts
/// none (no baseline). Ticks of members that exited in between are not seen.
pub fn tree_cpu_percent(
    prev: &Ticks,
    now_members: &[Member],
    prev_at: Mono,
    now: Mono,
    ticks_per_sec: u64,
) -> f64 {
    let tps = ticks_per_sec.max(1);
    let used: u64 = now_members
        .iter()
        .map(|m| match prev.get(&m.pid) {
            Some((start, ticks)) if *start == m.start_ticks => m.cpu_ticks.saturating_sub(*ticks),
            _ if m.start_ticks * 1000 / tps >= prev_at => m.cpu_ticks,
            _ => 0,
        })
        .sum();
    super::cpu_percent(0, used, now.saturating_sub(prev_at), tps)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    fn m(pid: u32, start_ticks: u64, cpu_ticks: u64, rss_mb: u64) -> Member {
        Member {
            pid,
            start_ticks,
            cpu_ticks,
            rss_bytes: rss_mb * MB,
        }
    }

    fn rule() -> TreeRule {
        TreeRule {
            memory_limit: ByteSize::parse("800MB").ok(),
            memory_duration: 60_000,
            cpu_threshold: None,
            cpu_duration: 3_000,
            ticks_per_sec: 100,
        }
    }

    fn tree(pm_id: u32, members: Vec<Member>) -> RootSample {
        RootSample {
            pm_id,
            pid: members.first().map_or(0, |m| m.pid),
            members,
        }
    }

    #[test]
    fn memory_over_the_limit_for_the_whole_duration_fails_the_app() {
        let r = rule();
        let mut w = TreeWatch::default();
        let sample = |rss: u64| vec![tree(0, vec![m(10, 1, 0, 100), m(11, 2, 0, rss)])];
        assert!(w.observe(&sample(600), 0, &r).is_empty());
        assert!(w.observe(&sample(712), 1_000, &r).is_empty()); // 812 MB from here
        assert!(w.observe(&sample(712), 60_999, &r).is_empty());
        let found = w.observe(&sample(712), 61_000, &r);
        assert_eq!(
            found,
            [TreeFinding {
                reason: "memory 812 MB > 800 MB for 60.0 s (tree of 2 processes)".into(),
                pm_ids: vec![],
            }]
        );
        assert_eq!(w.rss_bytes(), Some(812 * MB));
    }

    #[test]
    fn a_dip_under_the_limit_starts_the_duration_again() {
        let r = rule();
        let mut w = TreeWatch::default();
        let sample = |rss: u64| vec![tree(0, vec![m(10, 1, 0, rss)])];
        assert!(w.observe(&sample(900), 0, &r).is_empty());
        assert!(w.observe(&sample(800), 30_000, &r).is_empty()); // at the limit is not over it
        assert!(w.observe(&sample(900), 40_000, &r).is_empty());
        assert!(w.observe(&sample(900), 99_999, &r).is_empty());
        assert_eq!(w.observe(&sample(900), 100_000, &r).len(), 1);
    }

    #[test]
    fn every_instance_tree_counts_toward_the_app_limit() {
        let r = rule();
        let mut w = TreeWatch::default();
        let both = vec![
            tree(0, vec![m(10, 1, 0, 300), m(12, 2, 0, 150)]),
            tree(1, vec![m(20, 1, 0, 400)]),
        ];
        assert!(w.observe(&both, 0, &r).is_empty());
        let found = w.observe(&both, 60_000, &r);
        assert!(found[0].reason.contains("850 MB > 800 MB"), "{found:?}");
        assert!(found[0].reason.contains("tree of 3 processes"), "{found:?}");
        assert_eq!(w.totals(20).map(|t| t.rss_bytes), Some(400 * MB));
    }

    #[test]
    fn without_a_limit_memory_is_measured_not_judged() {
        let r = TreeRule {
            memory_limit: None,
            ..rule()
        };
        let mut w = TreeWatch::default();
        let big = vec![tree(0, vec![m(10, 1, 0, 90_000)])];
        assert!(w.observe(&big, 0, &r).is_empty());
        assert!(w.observe(&big, 600_000, &r).is_empty());
        assert_eq!(w.rss_bytes(), Some(90_000 * MB));
    }

    #[test]
    fn tree_cpu_sums_the_workers_pm2_does_not_see() {
        let r = TreeRule {
            memory_limit: None,
            cpu_threshold: Some(90.0),
            ..rule()
        };
        let mut w = TreeWatch::default();
        // The root idles; two workers use 50% each: 100% of one core for the tree.
        let at = |s: u64| {
            let t = s * 50;
            vec![tree(
                3,
                vec![m(10, 1, 0, 50), m(11, 2, t, 50), m(12, 2, t, 50)],
            )]
        };
        assert!(w.observe(&at(0), 0, &r).is_empty());
        assert!(w.observe(&at(1), 1_000, &r).is_empty());
        assert_eq!(w.totals(10).and_then(|t| t.cpu_pct), Some(100.0));
        assert!(w.observe(&at(2), 2_000, &r).is_empty());
        let found = w.observe(&at(3), 3_000, &r);
        assert_eq!(found[0].pm_ids, [3]);
        assert!(
            found[0]
                .reason
                .starts_with("pm_id 3 pid 10: tree CPU 100% >= 90% for 3000 ms"),
            "{found:?}"
        );
    }

    #[test]
    fn a_new_worker_counts_its_ticks_an_unseen_old_one_none() {
        let prev = BTreeMap::from([(10, (1, 100))]);
        // pid 11 started 1.5 s after boot, after the previous sample at 1 s: all 30 ticks.
        // pid 12 started before it and was not seen: no baseline, 0.
        let now = [m(10, 1, 120, 1), m(11, 150, 30, 1), m(12, 50, 500, 1)];
        assert_eq!(tree_cpu_percent(&prev, &now, 1_000, 2_000, 100), 50.0);
    }

    #[test]
    fn a_restarted_root_starts_afresh() {
        let r = rule();
        let mut w = TreeWatch::default();
        assert!(w
            .observe(&[tree(0, vec![m(10, 1, 0, 900)])], 0, &r)
            .is_empty());
        // Same pid, new process (pid reused): its own tree, but the app's memory stays over.
        assert!(w
            .observe(&[tree(0, vec![m(10, 7, 0, 900)])], 30_000, &r)
            .is_empty());
        assert_eq!(
            w.observe(&[tree(0, vec![m(10, 7, 0, 900)])], 60_000, &r)
                .len(),
            1
        );
        // A root gone (stopped): no tree, no memory.
        assert!(w.observe(&[tree(0, vec![])], 61_000, &r).is_empty());
        assert_eq!(w.rss_bytes(), None);
    }

    #[test]
    fn trees_are_sampled_at_most_every_quarter_duration_and_5_s() {
        let r = rule();
        assert_eq!(r.sample_period(), 5_000);
        let short = TreeRule {
            memory_duration: 2_000,
            ..r
        };
        assert_eq!(short.sample_period(), 500);
        let mut w = TreeWatch::default();
        assert!(w.due(0, &short));
        w.observe(&[tree(0, vec![m(10, 1, 0, 900)])], 0, &short);
        assert!(!w.due(499, &short));
        assert!(w.due(500, &short));
        let found = w.observe(&[tree(0, vec![m(10, 1, 0, 900)])], 2_000, &short);
        assert_eq!(w.last_found(), found);
    }
}
