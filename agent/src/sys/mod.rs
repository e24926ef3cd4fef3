//! The OS edges the rest of the agent uses through safe functions: files in the state directory
//! (`files`), users and privileges (`privilege`), systemd's notify socket (`notify`), the state
//! directory watched for readers and pauses (`dirwatch`).

pub mod dirwatch;
pub mod files;
pub mod notify;
pub mod pidfd;
pub mod privilege;
pub mod signals;
pub mod waker;

/// The machine's host name (uname's nodename), or "unknown-host".
pub fn hostname() -> String {
    let uname = rustix::system::uname();
    match uname.nodename().to_str() {
        Ok(h) if !h.is_empty() => h.to_string(),
        _ => "unknown-host".to_string(),
    }
}
