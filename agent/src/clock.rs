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

/// Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Epoch milliseconds of an RFC 3339 UTC time (`2026-11-30T18:00:00Z`, fractions allowed, as
/// AWS writes credential expiries); `None` for anything else.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.trim().as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        std::str::from_utf8(b.get(r)?).ok()?.parse().ok()
    };
    if b.get(4) != Some(&b'-') || b.get(10).is_none_or(|c| !matches!(c, b'T' | b't' | b' ')) {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let rest = std::str::from_utf8(b.get(19..)?).ok()?;
    let (frac, zone) = match rest.strip_prefix('.') {
        Some(f) => f.split_at(f.find(|c: char| !c.is_ascii_digit()).unwrap_or(f.len())),
        None => ("", rest),
    };
    if !matches!(zone, "Z" | "z" | "+00:00") || !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    let ms: u64 = format!("{frac:0<3}").get(..3)?.parse().ok()?;
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec;
    Some(u64::try_from(secs).ok()? * 1000 + ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_count_from_the_epoch() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2038, 1, 19), 24_855);
    }

    #[test]
    fn rfc3339_round_trips_and_refuses_other_forms() {
        assert_eq!(
            parse_rfc3339("2026-11-30T18:00:00Z"),
            Some(1_796_061_600_000)
        );
        assert_eq!(
            parse_rfc3339(&rfc3339(1_796_061_601_250)),
            Some(1_796_061_601_250)
        );
        assert_eq!(
            parse_rfc3339("2026-11-30T18:00:00.5Z"),
            Some(1_796_061_600_500)
        );
        assert_eq!(parse_rfc3339("2026-11-30T18:00:00+02:00"), None);
        assert_eq!(parse_rfc3339("30/11/2026"), None);
    }

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
