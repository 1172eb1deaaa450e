//! splice-proxy: a TCP passthrough proxy for a private EKS API server.
//!
//! One module per concern; see ARCHITECTURE.md for the life of a connection.

pub mod addr;
pub mod admin;
pub mod btf;
pub mod cli;
pub mod close_reason;
pub mod config;
pub mod connect;
pub mod connections;
pub mod cpus;
pub mod dataplane;
pub mod dns;
pub mod edge;
pub mod fd_passing;
pub mod health;
pub mod health_port;
pub mod kernel;
pub mod logging;
pub mod metrics;
pub mod probe;
pub mod proxy;
pub mod server;
pub mod service_manager;
pub mod sockopt;
pub mod source_filter;
pub mod tcpstat;

/// Process exit codes (also listed in `--help`).
pub mod exit {
    /// Stopped by SIGTERM (after the drain) or SIGINT; check-config: valid.
    pub const OK: u8 = 0;
    /// Failed while running.
    pub const RUNTIME: u8 = 1;
    /// Invalid command line or configuration.
    pub const CONFIG: u8 = 2;
    /// A listen, admin or health-check address could not be bound.
    pub const BIND: u8 = 3;
}
