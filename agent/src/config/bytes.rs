//! Memory sizes in config files: `"800MB"`, `"1.5GB"`, `"512MiB"`, `"800M"`.
//!
//! The units, case-insensitive: `B`; decimal `KB` `MB` `GB` `TB` (powers of 1000, as `free -H`
//! and cloud consoles print); binary `KiB` `MiB` `GiB` `TiB` and PM2's own `K` `M` `G` (powers of
//! 1024, so a `max_memory_restart = "800M"` copied from an ecosystem file means what PM2 meant).
//! A bare number is refused, like a duration without a unit. A size remembers its unit, so a
//! message shows the measured RSS in the unit the limit was written in.

/// A size in bytes and the unit it was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize {
    pub bytes: u64,
    unit: Unit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Unit {
    name: &'static str,
    size: u64,
}

const UNITS: [Unit; 12] = [
    Unit { name: "B", size: 1 },
    Unit {
        name: "KB",
        size: 1_000,
    },
    Unit {
        name: "MB",
        size: 1_000_000,
    },
    Unit {
        name: "GB",
        size: 1_000_000_000,
    },
    Unit {
        name: "TB",
        size: 1_000_000_000_000,
    },
    Unit {
        name: "KiB",
        size: 1 << 10,
    },
    Unit {
        name: "MiB",
        size: 1 << 20,
    },
    Unit {
        name: "GiB",
        size: 1 << 30,
    },
    Unit {
        name: "TiB",
        size: 1 << 40,
    },
    Unit {
        name: "K",
        size: 1 << 10,
    },
    Unit {
        name: "M",
        size: 1 << 20,
    },
    Unit {
        name: "G",
        size: 1 << 30,
    },
];

/// Why a text is not a size (a sentence fit to show next to the value in the file).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BytesError {
    #[error("`{0}` has no unit")]
    NoUnit(String),
    #[error("`{unit}` is not a unit in `{text}`")]
    UnknownUnit { unit: String, text: String },
    #[error("`{0}` is not a size")]
    NotANumber(String),
    #[error("`{0}` is too large")]
    TooLarge(String),
}

impl ByteSize {
    /// Parses `"<number><unit>"`; the number may have a fraction (`"1.5GB"`), spaces between the
    /// two are allowed.
    pub fn parse(text: &str) -> Result<ByteSize, BytesError> {
        let s = text.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, unit) = (s[..split].trim(), s[split..].trim());
        if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
            return Err(BytesError::NotANumber(s.to_string()));
        }
        let value: f64 = number
            .parse()
            .map_err(|_| BytesError::NotANumber(s.to_string()))?;
        if unit.is_empty() {
            return Err(BytesError::NoUnit(s.to_string()));
        }
        let unit = *UNITS
            .iter()
            .find(|u| u.name.eq_ignore_ascii_case(unit))
            .ok_or_else(|| BytesError::UnknownUnit {
                unit: unit.to_string(),
                text: s.to_string(),
            })?;
        let bytes = (value * unit.size as f64).round();
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(BytesError::TooLarge(s.to_string()));
        }
        Ok(ByteSize {
            bytes: bytes as u64,
            unit,
        })
    }

    /// `bytes` in this size's unit, as a person reads it: `812 MB`, `1.5 GiB`, `61 MB`.
    pub fn show(&self, bytes: u64) -> String {
        let v = bytes as f64 / self.unit.size as f64;
        let digits = if v >= 100.0 || v.fract() == 0.0 { 0 } else { 1 };
        format!("{v:.digits$} {}", self.unit.name)
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.show(self.bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_binary_and_pm2_units() {
        let b = |t: &str| ByteSize::parse(t).unwrap().bytes;
        assert_eq!(b("800MB"), 800_000_000);
        assert_eq!(b("1.5GB"), 1_500_000_000);
        assert_eq!(b("512MiB"), 512 << 20);
        assert_eq!(b("800M"), 800 << 20);
        assert_eq!(b("800m"), 800 << 20);
        assert_eq!(b("64 kb"), 64_000);
        assert_eq!(b("2G"), 2 << 30);
        assert_eq!(b("4096B"), 4096);
    }

    #[test]
    fn refuses_what_is_not_a_size() {
        assert_eq!(
            ByteSize::parse("800"),
            Err(BytesError::NoUnit("800".into()))
        );
        assert!(matches!(
            ByteSize::parse("800Mb/s"),
            Err(BytesError::UnknownUnit { .. })
        ));
        assert!(matches!(
            ByteSize::parse("MB"),
            Err(BytesError::NotANumber(_))
        ));
        assert!(matches!(
            ByteSize::parse("1.2.3MB"),
            Err(BytesError::NotANumber(_))
        ));
        assert!(matches!(
            ByteSize::parse("-5MB"),
            Err(BytesError::NotANumber(_))
        ));
        assert!(matches!(
            ByteSize::parse("99999999999TB"),
            Err(BytesError::TooLarge(_))
        ));
    }

    #[test]
    fn shows_in_the_unit_it_was_written_in() {
        let limit = ByteSize::parse("800MB").unwrap();
        assert_eq!(limit.to_string(), "800 MB");
        assert_eq!(limit.show(812_400_000), "812 MB");
        assert_eq!(ByteSize::parse("60MB").unwrap().show(61_450_000), "61.5 MB");
        assert_eq!(ByteSize::parse("1.5GiB").unwrap().to_string(), "1.5 GiB");
    }
}
