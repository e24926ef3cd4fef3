//! The OS edges the rest of the agent uses through safe functions: files in the state directory
//! (`files`), users and privileges (`privilege`), systemd's notify socket (`notify`).

pub mod files;
pub mod notify;
pub mod pidfd;
pub mod privilege;
pub mod signals;
pub mod waker;
