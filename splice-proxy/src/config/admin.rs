//! The admin endpoint, the TCP health-check port, the drain delay and the
//! upstream probe interval: validated before anything binds.

use std::{net::SocketAddr, time::Duration};

use super::{ConfigError, ListenerConfig, defaults, invalid};
/// Longest `drain_delay` and `probe_interval` accepted.
const MAX_DELAY: Duration = Duration::from_secs(3600);

/// Validated admin settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminConfig {
    /// The admin HTTP endpoint (port 0: any free port).
    pub listen: SocketAddr,
    /// The plain TCP health-check port, if any.
    pub health_listen: Option<SocketAddr>,
    /// After SIGTERM: not ready at once, listeners closed after this delay.
    pub drain_delay: Duration,
    /// Time between background probes of each upstream.
    pub probe_interval: Duration,
}

impl AdminConfig {
    /// How long a successful resolution or connect keeps the proxy ready:
    /// three probe intervals, so one failed or late probe does not flap it.
    #[must_use]
    pub fn readiness_window(&self) -> Duration {
        self.probe_interval.saturating_mul(3)
    }
}

pub(super) fn admin(
    listen: Option<SocketAddr>,
    health_listen: Option<SocketAddr>,
    drain_delay: Option<Duration>,
    probe_interval: Option<Duration>,
    listeners: &[ListenerConfig],
) -> Result<AdminConfig, ConfigError> {
    let listen = listen.unwrap_or(defaults::ADMIN_LISTEN);
    let drain_delay = drain_delay.unwrap_or(defaults::DRAIN_DELAY);
    if drain_delay > MAX_DELAY {
        return Err(invalid("drain_delay", "drain-delay", "longer than 1h"));
    }
    let probe_interval = probe_interval.unwrap_or(defaults::PROBE_INTERVAL);
    if probe_interval.is_zero() || probe_interval > MAX_DELAY {
        return Err(invalid("probe_interval", "probe-interval", "must be longer than 0 and at most 1h"));
    }
    // A fixed port may be used once: by a listener, the admin endpoint or the health port.
    let taken = |addr: SocketAddr| addr.port() != 0 && listeners.iter().any(|l| same_port(l.addr.0, addr));
    if taken(listen) {
        return Err(invalid("admin_listen", "admin-listen", format!("{listen} is also a listen address")));
    }
    if let Some(health) = health_listen {
        if taken(health) {
            return Err(invalid(
                "health_listen",
                "health-listen",
                format!("{health} is also a listen address"),
            ));
        }
        if health.port() != 0 && same_port(health, listen) {
            return Err(invalid(
                "health_listen",
                "health-listen",
                format!("{health} is also the admin address (admin_listen)"),
            ));
        }
    }
    Ok(AdminConfig { listen, health_listen, drain_delay, probe_interval })
}

/// Two addresses that cannot both be bound: the same port, and the same IP or
/// either one unspecified (0.0.0.0 / ::).
fn same_port(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Options};

    fn options(extra: impl FnOnce(&mut Options)) -> Options {
        let mut o = Options::listening("0.0.0.0:6443", "api.example.com:443");
        extra(&mut o);
        o
    }

    #[test]
    fn defaults() {
        let c = Config::from_options(options(|_| {})).unwrap().admin;
        assert_eq!(c.listen, "127.0.0.1:9901".parse().unwrap());
        assert_eq!(c.health_listen, None);
        assert_eq!(c.drain_delay, Duration::from_secs(30));
        assert_eq!(c.probe_interval, Duration::from_secs(10));
        assert_eq!(c.readiness_window(), Duration::from_secs(30));
    }

    #[test]
    fn errors_name_the_key_and_flag() {
        type Case = (fn(&mut Options), &'static str);
        let cases: [Case; 5] = [
            (|o| o.admin_listen = Some("127.0.0.1:6443".parse().unwrap()), "`admin_listen` (--admin-listen)"),
            (
                |o| o.health_listen = Some("10.0.0.1:6443".parse().unwrap()),
                "`health_listen` (--health-listen)",
            ),
            (
                |o| {
                    o.admin_listen = Some("0.0.0.0:9000".parse().unwrap());
                    o.health_listen = Some("127.0.0.1:9000".parse().unwrap());
                },
                "is also the admin address",
            ),
            (|o| o.probe_interval = Some(Duration::ZERO), "`probe_interval` (--probe-interval)"),
            (|o| o.drain_delay = Some(Duration::from_secs(7200)), "`drain_delay` (--drain-delay)"),
        ];
        for (set, needle) in cases {
            let err = Config::from_options(options(set)).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        }
    }

    #[test]
    fn port_zero_may_repeat() {
        let c = Config::from_options(options(|o| {
            o.listen = vec!["127.0.0.1:0".parse().unwrap()];
            o.admin_listen = Some("127.0.0.1:0".parse().unwrap());
            o.health_listen = Some("127.0.0.1:0".parse().unwrap());
        }))
        .unwrap();
        assert_eq!(c.admin.health_listen, Some("127.0.0.1:0".parse().unwrap()));
    }
}
