//! pmguard's installer: render what `pmguard install` lays down, observe the target, plan the
//! difference, apply it. Libraries never print; the `pmguard` binary renders plans and errors.

// Outside tests: a runtime error is returned, never a panic; output is the binary's job; long
// functions are several named steps (clippy.toml sets the threshold).
#![cfg_attr(
    not(test),
    warn(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::print_stdout,
        clippy::print_stderr,
        clippy::too_many_lines
    )
)]

pub mod aws;
pub mod bootstrap;
pub mod doctor;
pub mod error;
pub mod iam;
pub mod init;
pub mod layout;
pub mod legacy;
pub mod lock;
pub mod manifest;
pub mod plan;
pub mod pm2unit;
pub mod render;
pub mod systemd;
pub mod users;

pub use error::Error;
