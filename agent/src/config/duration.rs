//! Human durations in config files: `"500ms"`, `"10s"`, `"5m"`, `"1h"`, and sums such as `"1m30s"`.
//!
//! A bare number is refused on purpose: `timeout = 5` could mean seconds or milliseconds, and the
//! seed's scripts mixed both. Formatting is the inverse of parsing for every value it produces.

use std::time::Duration;

/// Parses a human duration. The error is a sentence fit to show next to the value in the file.
pub fn parse(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("`{s}` is not a duration"));
        }
        let number: u128 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{s}` is too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let millis_per = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(format!("`{s}` has no unit")),
            other => return Err(format!("`{other}` is not a unit in `{s}`")),
        };
        total = total
            .checked_add(number.saturating_mul(millis_per))
            .ok_or_else(|| format!("`{s}` is too large"))?;
        if total > u64::MAX as u128 {
            return Err(format!("`{s}` is too large"));
        }
    }
    Ok(Duration::from_millis(total as u64))
}

/// Formats a duration the way a person would write it in the config: `1m30s`, `500ms`, `0s`.
pub fn format(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, size) in [("h", 3_600_000u128), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
        if ms >= size {
            out.push_str(&format!("{}{unit}", ms / size));
            ms %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sums() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse(" 2d "), Ok(Duration::from_secs(172_800)));
    }

    #[test]
    fn refuses_what_is_ambiguous() {
        assert_eq!(parse("10"), Err("`10` has no unit".into()));
        assert!(parse("").is_err());
        assert!(parse("ten seconds").is_err());
        assert!(parse("10 s").is_err());
        assert!(parse("5y").unwrap_err().contains("`y` is not a unit"));
        assert!(parse("99999999999999999999999h").is_err());
    }

    #[test]
    fn format_round_trips() {
        for ms in [
            0u64, 1, 999, 1000, 1500, 60_000, 90_000, 3_600_000, 3_723_004,
        ] {
            let d = Duration::from_millis(ms);
            assert_eq!(parse(&format(d)), Ok(d), "{}", format(d));
        }
        assert_eq!(format(Duration::from_secs(90)), "1m30s");
    }
}
