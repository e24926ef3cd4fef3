//! The `[[apps]]` keys judged over an app's process tree (its PM2 processes and all their
//! descendants): `memory_limit`, `memory_duration` and `cpu_scope`. Like every reader, this one
//! reads each of its keys on every path, so they are the section's known keys.

use std::time::Duration;

use super::bytes::ByteSize;
use super::read::{ms, secs, Cx, Keys};

/// The smallest `memory_limit`: below this any process (an interpreter alone) is over it.
const MIN_LIMIT: u64 = 1 << 20;
/// The largest: 16 TiB, beyond any machine's memory.
const MAX_LIMIT: u64 = 1 << 44;

/// Which processes `cpu_threshold` is judged on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuScope {
    /// Each PM2 process alone (a spinning process is stuck and killed at once).
    #[default]
    Process,
    /// Each PM2 process together with all its descendants (workers PM2 does not see); a busy
    /// tree gets PM2's graceful restart, so the parent can stop its children.
    Tree,
}

/// The rules judged over the app's process tree.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TreeRules {
    /// RSS of the app's processes and all their descendants above this for `memory_duration` is
    /// a failed check (default: none). Units: B, KB/MB/GB/TB (1000), KiB/MiB/GiB/TiB and PM2's
    /// K/M/G (1024), case-insensitive; e.g. "800MB", "1.5GB", "512MiB", "800M".
    pub memory_limit: Option<ByteSize>,
    /// How long the tree's RSS must stay above `memory_limit` (default "60s").
    pub memory_duration: Duration,
    /// "process" (default): `cpu_threshold` per PM2 process; "tree": per PM2 process plus all
    /// its descendants, summed.
    pub cpu_scope: CpuScope,
}

impl TreeRules {
    /// Whether any rule needs the descendants; otherwise a check reads only the PM2 pids.
    pub fn measures_tree(&self) -> bool {
        self.memory_limit.is_some() || self.cpu_scope == CpuScope::Tree
    }
}

impl Cx<'_> {
    pub(super) fn tree_rules(&mut self, t: &mut Keys<'_>) -> TreeRules {
        let memory_limit = self.memory_limit(t);
        let memory_duration = self.duration(t, "memory_duration", secs(60), ms(0)..=secs(86_400));
        let cpu_scope = self.cpu_scope(t);
        TreeRules {
            memory_limit,
            memory_duration,
            cpu_scope,
        }
    }

    fn memory_limit(&mut self, t: &mut Keys<'_>) -> Option<ByteSize> {
        let help = "write a size with a unit, e.g. memory_limit = \"800MB\" (units: B, KB, MB, GB, TB; KiB, MiB, GiB, TiB; PM2's K, M, G = KiB, MiB, GiB)";
        let (v, span) = self.value(t, "memory_limit")?;
        let Some(text) = v.as_str() else {
            let message = match v.as_integer() {
                Some(n) => format!("`memory_limit` = {n} has no unit"),
                None => format!(
                    "`memory_limit` must be a size string, not {}",
                    v.type_name()
                ),
            };
            self.problem(span, message, Some(help.into()));
            return None;
        };
        match ByteSize::parse(text) {
            Ok(size) if (MIN_LIMIT..=MAX_LIMIT).contains(&size.bytes) => Some(size),
            Ok(_) => {
                self.problem(
                    span,
                    format!("memory_limit must be from 1 MiB to 16 TiB, not {text}"),
                    Some(help.into()),
                );
                None
            }
            Err(why) => {
                self.problem(span, format!("memory_limit: {why}"), Some(help.into()));
                None
            }
        }
    }

    fn cpu_scope(&mut self, t: &mut Keys<'_>) -> CpuScope {
        match self.string(t, "cpu_scope") {
            None => CpuScope::Process,
            Some((s, _)) if s == "process" => CpuScope::Process,
            Some((s, _)) if s == "tree" => CpuScope::Tree,
            Some((s, span)) => {
                self.problem(
                    span,
                    format!("cpu_scope must be \"process\" or \"tree\", not \"{s}\""),
                    Some("write cpu_scope = \"tree\" to judge cpu_threshold on each PM2 process and all its descendants, or leave it out (\"process\")".into()),
                );
                CpuScope::Process
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{Config, ConfigError, Problem};
    use super::*;

    fn app(keys: &str) -> Result<Config, Vec<Problem>> {
        Config::parse(
            Path::new("/etc/pmguard/pmguard.toml"),
            &format!("[[apps]]\nname = \"web\"\n{keys}"),
        )
        .map_err(|e| match e {
            ConfigError::Invalid { problems, .. } => problems,
            other => panic!("expected problems, got {other:?}"),
        })
    }

    #[test]
    fn no_tree_rule_by_default() {
        let c = app("").unwrap();
        assert_eq!(c.apps[0].tree.memory_limit, None);
        assert_eq!(c.apps[0].tree.memory_duration, secs(60));
        assert_eq!(c.apps[0].tree.cpu_scope, CpuScope::Process);
        assert!(!c.apps[0].tree.measures_tree());
    }

    #[test]
    fn memory_limit_and_scope_are_read() {
        let c = app("memory_limit = \"1.5GB\"\nmemory_duration = \"2s\"\ncpu_scope = \"tree\"\n")
            .unwrap();
        let t = c.apps[0].tree;
        assert_eq!(t.memory_limit.map(|m| m.bytes), Some(1_500_000_000));
        assert_eq!(t.memory_duration, secs(2));
        assert_eq!(t.cpu_scope, CpuScope::Tree);
        assert!(t.measures_tree());
        let t = app("cpu_scope = \"tree\"\n").unwrap().apps[0].tree;
        assert!(t.measures_tree());
    }

    #[test]
    fn bad_values_point_at_the_value_with_a_fix() {
        let p =
            app("memory_limit = 800\nmemory_duration = \"1x\"\ncpu_scope = \"all\"\n").unwrap_err();
        let at: Vec<(usize, usize, &str)> = p
            .iter()
            .map(|p| (p.line, p.column, p.message.as_str()))
            .collect();
        assert_eq!(
            at,
            [
                (3, 16, "`memory_limit` = 800 has no unit"),
                (4, 19, "memory_duration: `x` is not a unit in `1x`"),
                (
                    5,
                    13,
                    "cpu_scope must be \"process\" or \"tree\", not \"all\""
                ),
            ]
        );
        assert!(p[0].help.as_deref().unwrap().contains("\"800MB\""), "{p:?}");
        let p = app("memory_limit = \"512KB\"\n").unwrap_err();
        assert_eq!(
            p[0].message,
            "memory_limit must be from 1 MiB to 16 TiB, not 512KB"
        );
        let p = app("memory_limit = \"80 Mb/s\"\n").unwrap_err();
        assert_eq!(
            p[0].message,
            "memory_limit: `Mb/s` is not a unit in `80 Mb/s`"
        );
        let p = app("memory_limt = \"80MB\"\n").unwrap_err();
        assert_eq!(p[0].help.as_deref(), Some("did you mean `memory_limit`?"));
    }
}
