//! The agent's side of maintenance pauses: noticing a change to `pauses.json`, and ending the
//! pauses whose deadline passed, or that are not plausible (with a `pause_expired` event).
//!
//! The watch loop's pulse calls `refresh` when the state directory's watch says the file was
//! replaced or removed (without the watch: at most every 500 ms, one stat(2) of the file, and a
//! read only when it changed); the main thread calls `tick` on its slow tick and when the pulse
//! asks for `status.json`. Checks read the copy kept in `Shared` (`Shared::pause_of`); a restart reads
//! the file itself again under `restart.lock` (`App::book_restart`), so once `pause` has written
//! the file no restart starts, even before the next tick.

use std::time::Duration;

use crate::clock;
use crate::report::events::{Event, Kind};
use crate::report::pauses::Lapse;
use crate::sync::lock;

use super::shared::Shared;

/// Reads `pauses.json` again if it changed since the last read. Returns whether it did.
pub fn refresh(shared: &Shared) -> bool {
    // Under the lock from the stat to the store: the watch loop's pulse and the main thread
    // both refresh, and a slower reader must not put an older book back over a newer one.
    let mut held = lock(&shared.pauses);
    let stamp = shared.state.pauses_stamp();
    // Unchanged, or still absent (no file was ever read, or its removal was already read).
    if held.0 == stamp {
        return false;
    }
    let book = shared.state.read_pauses();
    let changed = held.1 != book;
    *held = (stamp, book);
    changed
}

/// How long until the earliest pause in force ends (`None`: no pause), so the main thread can
/// wake for it: its `pause_expired` event is then on time however slow its tick.
pub fn until_next_deadline(shared: &Shared) -> Option<Duration> {
    let now = clock::wall_ms();
    lock(&shared.pauses)
        .1
        .apps
        .values()
        .map(|p| p.until_ms.saturating_sub(now))
        .min()
        .map(Duration::from_millis)
}

/// The revision of `pauses.json` the agent applied (shown in `status.json`).
pub fn applied_revision(shared: &Shared) -> u64 {
    lock(&shared.pauses).1.revision
}

/// Removes the pauses whose deadline passed from `pauses.json`, each with a `pause_expired`
/// event. Checks stop honouring a pause at its deadline whether or not this has run yet.
pub fn expire(shared: &Shared) {
    let now = clock::wall_ms();
    let due = lock(&shared.pauses)
        .1
        .apps
        .values()
        .any(|p| !p.is_active(now));
    if !due {
        return;
    }
    // Briefly: a restart in flight holds the lock for seconds; the next tick tries again.
    let Ok(_guard) = shared.state.lock_restarts(Duration::from_millis(100)) else {
        return;
    };
    let mut book = shared.state.read_pauses();
    let expired = book.take_expired(now);
    if !expired.is_empty() {
        if let Err(error) = shared.state.write_pauses(&mut book) {
            tracing::warn!(message = "Cannot save the pause file.", path = %shared.state.dir.display(), %error);
            return;
        }
    }
    for (app, p, lapse) in expired {
        let text = if lapse == Lapse::Deadline {
            format!(
                "Maintenance pause ended at its deadline {}; watching and acting again.",
                clock::rfc3339(p.until_ms)
            )
        } else {
            tracing::warn!(message = "Ignoring a pause pmguard could not have set.", app = %app, why = lapse.why(), since = %clock::rfc3339(p.since_ms), until = %clock::rfc3339(p.until_ms));
            format!(
                "Maintenance pause ended: {}; watching and acting again.",
                lapse.why()
            )
        };
        let mut e = Event::new(Kind::PauseExpired, Some(&app), text)
            .with("until", clock::rfc3339(p.until_ms))
            .with("why", lapse.why());
        if let Some(r) = &p.reason {
            e = e.with("reason", r.as_str());
        }
        shared.emit(e);
    }
    refresh(shared);
}

/// The main thread's tick (a few seconds apart): expire what is due, then notice a change. Returns whether the pauses
/// changed (the daemon then writes `status.json` at once, so `pause` sees it applied).
pub fn tick(shared: &Shared) -> bool {
    expire(shared);
    refresh(shared)
}
