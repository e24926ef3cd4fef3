//! Reading TOML tables into values, collecting every problem with its line, column and fix.
//!
//! The schema is written once: a section's known keys are exactly the keys its reader asks for
//! (`Keys` records each one), so a key in the file that no code reads is reported as unknown,
//! with the closest known key as the suggestion. Every reader therefore reads each of its keys
//! on every path.

use std::ops::Range;
use std::time::Duration;

use toml_edit::{Item, Table, Value};

use super::duration;
use super::target::StatusMatch;
use super::Problem;

/// Collects problems while walking the document.
pub(super) struct Cx<'s> {
    pub(super) src: &'s str,
    pub(super) problems: Vec<Problem>,
}

/// One section's table, and the keys its reader asked for.
pub(super) struct Keys<'t> {
    table: &'t Table,
    read: Vec<&'static str>,
    section: &'static str,
}

impl<'t> Keys<'t> {
    pub(super) fn new(table: &'t Table, section: &'static str) -> Keys<'t> {
        Keys {
            table,
            read: Vec::new(),
            section,
        }
    }

    /// The item under `key`, which this section now knows.
    pub(super) fn item(&mut self, key: &'static str) -> Option<&'t Item> {
        if !self.read.contains(&key) {
            self.read.push(key);
        }
        self.table.get(key)
    }
}

impl std::ops::Deref for Keys<'_> {
    type Target = Table;

    fn deref(&self) -> &Table {
        self.table
    }
}

impl Cx<'_> {
    /// The line and column (from 1) where `span` starts.
    pub(super) fn place(&self, span: Range<usize>) -> (usize, usize) {
        let at = span.start.min(self.src.len());
        let before = &self.src[..at];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, column)
    }

    pub(super) fn problem(&mut self, span: Range<usize>, message: String, help: Option<String>) {
        let (line, column) = self.place(span);
        self.problems.push(Problem {
            line,
            column,
            message,
            help,
        });
    }

    /// Reports every key of the section that its reader never asked for: the keys a section
    /// knows are exactly the keys its reader reads.
    pub(super) fn finish(&mut self, keys: Keys<'_>) {
        let known: Vec<&str> = keys.read.clone();
        for (key, _) in keys.table.iter() {
            if !known.contains(&key) {
                let help = match suggest(key, &known) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("the keys of {} are: {}", keys.section, known.join(", ")),
                };
                self.problem(
                    key_span(keys.table, key),
                    format!("unknown key `{key}` in {}", keys.section),
                    Some(help),
                );
            }
        }
    }

    pub(super) fn value<'t>(
        &mut self,
        t: &mut Keys<'t>,
        key: &'static str,
    ) -> Option<(&'t Value, Range<usize>)> {
        let item = t.item(key)?;
        let span = item.span().unwrap_or_else(|| key_span(t, key));
        match item.as_value() {
            Some(v) => Some((v, span)),
            None => {
                self.problem(span, format!("`{key}` must be a value, not a table"), None);
                None
            }
        }
    }

    pub(super) fn string(
        &mut self,
        t: &mut Keys<'_>,
        key: &'static str,
    ) -> Option<(String, Range<usize>)> {
        let (v, span) = self.value(t, key)?;
        match v.as_str() {
            Some(s) => Some((s.to_string(), span)),
            None => {
                self.problem(
                    span,
                    format!("`{key}` must be a string, not {}", v.type_name()),
                    Some(format!("put the value in double quotes: {key} = \"...\"")),
                );
                None
            }
        }
    }

    pub(super) fn boolean(&mut self, t: &mut Keys<'_>, key: &'static str) -> Option<bool> {
        let (v, span) = self.value(t, key)?;
        match v.as_bool() {
            Some(b) => Some(b),
            None => {
                self.problem(
                    span,
                    format!("`{key}` must be true or false, not {}", v.type_name()),
                    Some(format!("write {key} = true or {key} = false")),
                );
                None
            }
        }
    }

    pub(super) fn integer(
        &mut self,
        t: &mut Keys<'_>,
        key: &'static str,
        default: i64,
        range: std::ops::RangeInclusive<i64>,
    ) -> i64 {
        let Some((v, span)) = self.value(t, key) else {
            return default;
        };
        let help = format!(
            "set {key} to a whole number from {} to {} (default {default})",
            range.start(),
            range.end()
        );
        let found = v.as_integer();
        self.in_range(
            found,
            &range,
            default,
            (key, "a whole number", v.type_name()),
            span,
            help,
        )
    }

    pub(super) fn number(
        &mut self,
        t: &mut Keys<'_>,
        key: &'static str,
        default: f64,
        range: std::ops::RangeInclusive<f64>,
    ) -> f64 {
        let Some((v, span)) = self.value(t, key) else {
            return default;
        };
        let n = v.as_float().or_else(|| v.as_integer().map(|i| i as f64));
        let help = format!(
            "set {key} to a number from {} to {} (% of one core; default {default})",
            range.start(),
            range.end()
        );
        self.in_range(
            n,
            &range,
            default,
            (key, "a number", v.type_name()),
            span,
            help,
        )
    }

    /// `found` if it is within `range`; otherwise the problem (out of range, or not `what`:
    /// `(key, what, the type found)`) and the default.
    fn in_range<N: PartialOrd + Copy + std::fmt::Display>(
        &mut self,
        found: Option<N>,
        range: &std::ops::RangeInclusive<N>,
        default: N,
        (key, what, found_type): (&str, &str, &str),
        span: Range<usize>,
        help: String,
    ) -> N {
        let message = match found {
            Some(n) if range.contains(&n) => return n,
            Some(n) => format!("{key} must be {}..={}, not {n}", range.start(), range.end()),
            None => format!("`{key}` must be {what}, not {found_type}"),
        };
        self.problem(span, message, Some(help));
        default
    }

    pub(super) fn duration(
        &mut self,
        t: &mut Keys<'_>,
        key: &'static str,
        default: Duration,
        range: std::ops::RangeInclusive<Duration>,
    ) -> Duration {
        let Some((v, span)) = self.value(t, key) else {
            return default;
        };
        let bounds = format!(
            "from {} to {}",
            duration::format(*range.start()),
            duration::format(*range.end())
        );
        let help = format!(
            "write a duration {bounds} with a unit, e.g. {key} = \"{}\" (the default)",
            duration::format(default)
        );
        let Some(text) = v.as_str() else {
            let message = match v.as_integer() {
                Some(n) => format!("`{key}` = {n} has no unit"),
                None => format!("`{key}` must be a duration string, not {}", v.type_name()),
            };
            self.problem(span, message, Some(help));
            return default;
        };
        match duration::parse(text) {
            Ok(d) if range.contains(&d) => d,
            Ok(_) => {
                self.problem(
                    span,
                    format!("{key} must be {bounds}, not {text}"),
                    Some(help),
                );
                default
            }
            Err(why) => {
                self.problem(span, format!("{key}: {why}"), Some(help));
                default
            }
        }
    }

    pub(super) fn status_match(&mut self, t: &mut Keys<'_>) -> StatusMatch {
        let Some((v, span)) = self.value(t, "expect_status") else {
            return StatusMatch::Success;
        };
        let help = "write one status or a list, e.g. expect_status = 200 or [200, 204]";
        let valid = |n: i64| (100..=599).contains(&n);
        let codes: Option<Vec<i64>> = match v {
            Value::Integer(i) => Some(vec![*i.value()]),
            Value::Array(a) => a.iter().map(Value::as_integer).collect(),
            _ => None,
        };
        match codes {
            Some(c) if !c.is_empty() && c.iter().all(|n| valid(*n)) => {
                StatusMatch::AnyOf(c.into_iter().map(|n| n as u16).collect())
            }
            _ => {
                self.problem(
                    span,
                    "expect_status must be HTTP statuses (100..=599)".into(),
                    Some(help.into()),
                );
                StatusMatch::Success
            }
        }
    }
}

pub(super) fn key_span(t: &Table, key: &str) -> Range<usize> {
    t.key(key).and_then(|k| k.span()).unwrap_or(0..0)
}

pub(super) fn value_span(t: &Table, key: &str) -> Range<usize> {
    t.get(key)
        .and_then(Item::span)
        .unwrap_or_else(|| key_span(t, key))
}

pub(super) fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

pub(super) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The closest known word, if it is close enough to be a likely typo.
pub(super) fn suggest<'k>(word: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (levenshtein(word, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}
