//! What both binaries' command lines share: the long version string, shell completions and man
//! pages generated from the clap definitions (so they never drift from `--help`).
//!
//! The packaging script (`dist/build`) calls each binary's hidden `generate-man` to lay the man
//! pages into the package; users call `completions <shell>`.

use std::path::{Path, PathBuf};

/// `0.1.0 (commit 0123456789ab)`: the version and the git commit the binary was built from
/// ("unknown" when built outside a git checkout); see `agent/build.rs`.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("PMGUARD_GIT_COMMIT"),
    ")"
);

pub use clap_complete::Shell;

/// Writes `shell`'s completion script for `cmd` to `out`.
pub fn write_completions(
    shell: Shell,
    cmd: &mut clap::Command,
    out: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, cmd, name, out);
    out.flush()
}

/// Writes `<name>.1` for `cmd` and one `<name>-<sub>.1` per subcommand into `dir` (created if
/// missing); returns the files written.
pub fn write_man_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd;
    cmd.build();
    let mut written = Vec::new();
    write_page(&cmd, dir, &mut written)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        write_page(sub, dir, &mut written)?;
    }
    Ok(written)
}

/// One page, named by the command's display name (`build()` makes a subcommand's `tool-run`).
fn write_page(cmd: &clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let name = cmd
        .get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_string();
    let mut bytes = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut bytes)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, bytes)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    written.push(path);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> clap::Command {
        clap::Command::new("tool")
            .version("1.0")
            .about("A tool.")
            .subcommand(clap::Command::new("run").about("Runs it."))
            .subcommand(clap::Command::new("secret").hide(true))
    }

    #[test]
    fn long_version_names_the_version_and_a_commit() {
        assert!(LONG_VERSION.starts_with(env!("CARGO_PKG_VERSION")));
        assert!(LONG_VERSION.contains("(commit "), "{LONG_VERSION}");
    }

    #[test]
    fn man_pages_cover_the_command_and_each_visible_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_man_pages(sample(), dir.path()).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["tool.1", "tool-run.1"]);
        let page = std::fs::read_to_string(&files[1]).unwrap();
        assert!(page.contains(".TH tool-run 1"), "{page}");
        assert!(page.contains("Runs it."), "{page}");
    }

    #[test]
    fn bash_completion_lists_the_subcommands() {
        let mut out = Vec::new();
        write_completions(Shell::Bash, &mut sample(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("complete -F _tool"), "{text}");
        assert!(text.contains("run"), "{text}");
    }
}
