//! The running agent: one app's check and actions (`app`), every app's checks on one thread
//! (`watch`), the threads, signals and reloads (`daemon`), the cron backup check (`check`), and maintenance pauses (`maintenance`).

pub mod app;
pub mod check;
pub mod daemon;
pub mod maintenance;
pub mod pulse;
pub mod restart;
pub mod resurrect;
pub mod shared;
pub mod watch;
