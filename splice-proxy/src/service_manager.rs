//! Notifications to the service manager (sd_notify(3), systemd `Type=notify`):
//! `READY=1` once every listener is bound and its accept loop runs,
//! `STOPPING=1` when a drain or a stop begins, each with a `STATUS=` line
//! (`systemctl status` shows it). Nothing is sent when `NOTIFY_SOCKET` is
//! unset (not started by systemd). A send that fails is logged and otherwise
//! ignored: the proxy serves either way, and systemd's start timeout reports
//! a readiness that never arrived.

use std::{fmt::Display, time::Duration};

use sd_notify::NotifyState;

/// The variable systemd sets for `Type=notify` services.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Every listener accepts: `READY=1`, and the addresses and data plane as status.
pub fn ready<A: Display>(listening: &[A], dataplane: &str) {
    let addrs: Vec<String> = listening.iter().map(ToString::to_string).collect();
    let status = format!("serving on {} (data plane {dataplane})", addrs.join(", "));
    send(&[NotifyState::Ready, NotifyState::Status(&status)], "READY=1");
}

/// A graceful upgrade: this process took the sockets over and is the
/// service's main process now (`MAINPID=`, accepted with `NotifyAccess=all`),
/// ready, with the addresses as status.
pub fn took_over<A: Display>(listening: &[A], dataplane: &str) {
    let addrs: Vec<String> = listening.iter().map(ToString::to_string).collect();
    let status = format!("serving on {} (data plane {dataplane}; took over by upgrade)", addrs.join(", "));
    let pid = std::process::id();
    send(&[NotifyState::MainPid(pid), NotifyState::Ready, NotifyState::Status(&status)], "MAINPID, READY=1");
}

/// SIGTERM: `STOPPING=1`; `open` connections get `timeout` to finish.
pub fn draining(open: usize, timeout: Duration) {
    let status = format!("draining: {open} connections open, drain timeout {timeout:?}");
    send(&[NotifyState::Stopping, NotifyState::Status(&status)], "STOPPING=1");
}

/// SIGINT: `STOPPING=1`, every connection is closed now.
pub fn stopping_now(open: usize) {
    let status = format!("stopping: closing {open} open connections now");
    send(&[NotifyState::Stopping, NotifyState::Status(&status)], "STOPPING=1");
}

fn send(states: &[NotifyState<'_>], what: &'static str) {
    let Some(socket) = std::env::var_os(NOTIFY_SOCKET) else {
        return;
    };
    match sd_notify::notify(states) {
        Ok(()) => tracing::debug!(what, ?socket, "service manager notified"),
        Err(error) => tracing::warn!(%error, what, ?socket, "cannot notify the service manager"),
    }
}
