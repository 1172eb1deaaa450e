//! Logs go to standard error through `tracing`, as text or JSON lines. The
//! filter comes from RUST_LOG (default `info`). Records of the `log` crate,
//! among them the kernel programs' aya-log records (target `proxy_ebpf`), are
//! bridged into the same output.

use std::io::IsTerminal as _;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        // Colours only for a terminal: the journal and a container's log
        // store keep the escape codes as text, and writing them costs every
        // access line.
        LogFormat::Text => registry
            .with(fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    // Which worker served a connection (`worker-N`).
                    .with_thread_names(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    if let Err(error) = result {
        eprintln!("logging was already initialised: {error}");
    }
}

/// The most verbose level enabled for the kernel programs' log target, so the
/// programs skip formatting records nobody would see (quiet by default).
#[must_use]
pub fn kernel_log_level() -> log::LevelFilter {
    use tracing::Level;
    if tracing::enabled!(target: "proxy_ebpf", Level::TRACE) {
        log::LevelFilter::Trace
    } else if tracing::enabled!(target: "proxy_ebpf", Level::DEBUG) {
        log::LevelFilter::Debug
    } else if tracing::enabled!(target: "proxy_ebpf", Level::INFO) {
        log::LevelFilter::Info
    } else if tracing::enabled!(target: "proxy_ebpf", Level::WARN) {
        log::LevelFilter::Warn
    } else if tracing::enabled!(target: "proxy_ebpf", Level::ERROR) {
        log::LevelFilter::Error
    } else {
        log::LevelFilter::Off
    }
}
