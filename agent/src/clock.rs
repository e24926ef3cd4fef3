//! Clocks. Decisions use `Mono` (CLOCK_BOOTTIME in ms): monotonic, counts suspend, and is the
//! same clock for every process of one boot, so the daemon and the backup check can compare the
//! times they persist. `boot_epoch` (wall time minus boot time: when this boot began) says
//! whether a persisted `Mono` belongs to this boot. Unlike /proc/sys/kernel/random/boot_id it
//! reads the same inside systemd's sandbox and in containers (systemd-nspawn overmounts boot_id,
//! and ProtectKernelTunables= remounts /proc/sys, so two processes of one boot can disagree).

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds of CLOCK_BOOTTIME: the time every decision is made in.
pub type Mono = u64;

pub fn mono_now() -> Mono {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Wall-clock milliseconds since the epoch, for people and for event timestamps.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// When this boot began, in wall-clock epoch milliseconds (wall now minus CLOCK_BOOTTIME).
pub fn boot_epoch() -> u64 {
    wall_ms().saturating_sub(mono_now())
}

/// Whether a `boot_epoch` persisted earlier names this boot. The two readings of one boot differ
/// by scheduling jitter and by clock slewing; a reboot moves it by at least the boot's length.
pub fn same_boot(persisted: u64) -> bool {
    boot_epoch().abs_diff(persisted) < 30_000
}

/// Formats epoch milliseconds as RFC 3339 UTC (`2026-11-28T13:45:01.250Z`).
pub fn rfc3339(epoch_ms: u64) -> String {
    let secs = epoch_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!(
        "{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.{:03}Z",
        epoch_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_873_501_250), "2026-11-28T13:45:01.250Z");
    }

    #[test]
    fn boot_epoch_is_stable_within_a_boot() {
        let a = boot_epoch();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(same_boot(a));
        assert!(!same_boot(a - 3_600_000));
    }

    #[test]
    fn mono_moves_forward() {
        let a = mono_now();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(mono_now() >= a + 5);
    }
}
