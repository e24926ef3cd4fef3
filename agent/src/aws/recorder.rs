//! The hand-off between the monitoring threads and the sink: a mutex'd aggregate per app and a
//! bounded list of events. Workers only take a short lock; they never wait on AWS.
//!
//! Invariants: recording a check allocates nothing once the app is known; the event list is
//! bounded (the oldest is dropped and counted beyond it); the sink takes everything at once at
//! each flush, so a datum or event is handed over exactly once.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use super::logs;
use super::metrics::{AppAggregate, CheckSample};
use crate::report::events::{Event, Forward};

/// Events held between two flushes before the oldest is dropped.
pub const MAX_PENDING_EVENTS: usize = 10_000;

/// What the sink takes at a flush.
#[derive(Debug, Default)]
pub struct Taken {
    pub apps: BTreeMap<String, AppAggregate>,
    pub events: Vec<Event>,
    pub dropped: u64,
    /// A full flush (metrics and heartbeat), not only an early delivery of events.
    pub heartbeat: bool,
    /// The daemon's watch loop was on schedule since the last flush (see `Recorder::alive`).
    pub alive: bool,
}

#[derive(Debug, Default)]
struct Inner {
    apps: BTreeMap<String, AppAggregate>,
    events: VecDeque<Event>,
    dropped: u64,
    alive: bool,
}

/// Shared by the workers (writers) and the sink (the one reader).
#[derive(Debug, Default)]
pub struct Recorder {
    inner: Mutex<Inner>,
    /// Woken when an event that raises an alert arrives, so alerts do not wait for a flush.
    urgent: Arc<crate::sync::Signal>,
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        crate::sync::lock(&self.inner)
    }

    pub fn urgent(&self) -> Arc<crate::sync::Signal> {
        self.urgent.clone()
    }

    /// The daemon's main loop found every worker on schedule (called once per tick): the next
    /// flush carries an AgentHeartbeat.
    pub fn alive(&self) {
        self.lock().alive = true;
    }

    /// One check of `app`.
    pub fn check(&self, app: &str, sample: &CheckSample) {
        let mut g = self.lock();
        match g.apps.get_mut(app) {
            Some(a) => a.record(sample),
            None => {
                let mut a = AppAggregate::default();
                a.record(sample);
                g.apps.insert(app.to_string(), a);
            }
        }
    }

    /// `n` restarts of `app` (by pmguard, or by PM2 as noticed by the agent).
    pub fn restarts(&self, app: &str, n: u64) {
        if n == 0 {
            return;
        }
        let mut g = self.lock();
        match g.apps.get_mut(app) {
            Some(a) => a.restarts += n,
            None => {
                let a = AppAggregate {
                    restarts: n,
                    ..AppAggregate::default()
                };
                g.apps.insert(app.to_string(), a);
            }
        }
    }

    /// Everything recorded since the last take. Apps stay known (with empty aggregates), so the
    /// next checks allocate nothing.
    pub fn take(&self) -> Taken {
        let mut g = self.lock();
        let apps = g
            .apps
            .iter_mut()
            .filter(|(_, a)| !a.is_empty())
            .map(|(k, a)| (k.clone(), std::mem::take(a)))
            .collect();
        Taken {
            apps,
            events: g.events.drain(..).collect(),
            dropped: std::mem::take(&mut g.dropped),
            heartbeat: true,
            alive: std::mem::take(&mut g.alive),
        }
    }

    /// Only the events (for an early delivery of alerts).
    pub fn take_events(&self) -> Taken {
        let mut g = self.lock();
        Taken {
            apps: BTreeMap::new(),
            events: g.events.drain(..).collect(),
            dropped: std::mem::take(&mut g.dropped),
            heartbeat: false,
            alive: false,
        }
    }
}

impl Forward for Recorder {
    fn forward(&self, e: &Event) {
        if !logs::is_shipped(e.kind) {
            return;
        }
        {
            let mut g = self.lock();
            if g.events.len() >= MAX_PENDING_EVENTS {
                g.events.pop_front();
                g.dropped += 1;
            }
            g.events.push_back(e.clone());
        }
        if logs::is_alert(e.kind) {
            self.urgent.notify();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::events::Kind;

    #[test]
    fn hands_over_each_sample_and_event_once() {
        let r = Recorder::new();
        let ok = CheckSample {
            healthy: true,
            response_ms: Some(3.0),
            cert_days: None,
            ..Default::default()
        };
        r.check("web", &ok);
        r.check("web", &ok);
        r.restarts("web", 1);
        r.restarts("api", 2);
        r.forward(&Event::new(Kind::Probe, Some("web"), "Probe passed."));
        r.forward(&Event::new(Kind::Restart, Some("web"), "Restarting."));
        let t = r.take();
        assert_eq!(t.apps["web"].status.unwrap().count, 2.0);
        assert_eq!(t.apps["web"].restarts, 1);
        assert_eq!(t.apps["api"].restarts, 2);
        assert_eq!(t.events.len(), 1, "probe results are not shipped");
        let t = r.take();
        assert!(t.apps.is_empty() && t.events.is_empty());
    }

    #[test]
    fn pending_events_are_bounded_and_counted() {
        let r = Recorder::new();
        for i in 0..MAX_PENDING_EVENTS + 5 {
            r.forward(&Event::new(Kind::StateChange, Some("web"), format!("{i}")));
        }
        let t = r.take_events();
        assert_eq!(t.events.len(), MAX_PENDING_EVENTS);
        assert_eq!(t.events[0].message, "5");
        assert_eq!(t.dropped, 5);
    }
}
