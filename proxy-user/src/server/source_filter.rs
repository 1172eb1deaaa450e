//! The server's side of the XDP source filter: attach at start-up, reload
//! its allow list on SIGHUP, log its totals at exit.

use crate::{
    config::Config,
    xdp_filter::{SourceFilter, SourceFilterConfig, SourceFilterError},
};

/// Loads the source filter with its allow list and the `ports` known before
/// binding, then attaches it, logging the mode and why.
pub(super) fn start(config: &SourceFilterConfig, ports: &[u16]) -> Result<SourceFilter, SourceFilterError> {
    let mut filter = SourceFilter::load(&config.allowed)?;
    filter.guard_ports(ports)?;
    let attached = filter.attach(&config.interface)?;
    tracing::info!(
        interface = attached.interface,
        mode = %attached.mode,
        why = attached.why,
        allowed = ?strings(&filter.allowed()),
        "XDP source filter attached"
    );
    Ok(filter)
}

fn strings<T: ToString>(items: &[T]) -> Vec<String> {
    items.iter().map(ToString::to_string).collect()
}

/// SIGHUP: applies the allow list of the reloaded configuration (validated
/// by the caller, [`super::reload`]) to the source filter.
pub(super) fn reload(filter: Option<&mut SourceFilter>, config: &Config) {
    let Some(filter) = filter else {
        tracing::info!("SIGHUP: no XDP source filter, nothing to reload");
        return;
    };
    let Some(new) = &config.source_filter else {
        tracing::warn!(
            "SIGHUP: the configuration no longer sets xdp_interface; removing the filter needs a \
             restart; the source list stays as it was"
        );
        return;
    };
    if let Some(attached) = filter.attached().filter(|a| a.interface != new.interface) {
        tracing::warn!(
            attached = attached.interface,
            configured = new.interface,
            "SIGHUP: moving the filter to another interface needs a restart; reloading its list only"
        );
    }
    // The counters so far, so each reload also reports what the old list did.
    let (passed, dropped) = filter.counters().map_or((None, None), |c| (Some(c.passed()), Some(c.dropped)));
    match filter.reload(&new.allowed) {
        Ok(summary) => tracing::info!(
            added = ?strings(&summary.added),
            removed = ?strings(&summary.removed),
            allowed = ?strings(&filter.allowed()),
            passed,
            dropped,
            "SIGHUP: source list reloaded"
        ),
        Err(error) => {
            tracing::error!(%error, "SIGHUP: reloading the source list failed; the old list stays")
        }
    }
}

/// One log line with the filter's counters over the whole run.
pub(super) fn log_totals(filter: &SourceFilter) {
    match filter.counters() {
        Ok(c) => tracing::info!(
            passed = c.passed(),
            dropped = c.dropped,
            allowed = c.allowed,
            unguarded = c.unguarded,
            fragments = c.fragments,
            malformed = c.malformed,
            "xdp source filter totals"
        ),
        Err(error) => tracing::warn!(%error, "cannot read the XDP source filter counters"),
    }
}
