//! Configuration: the TOML file ([`file`]) and the flags are read into the
//! same [`Options`] shape ([`options`]), the flags win ([`overlay`]), and
//! [`Config::from_options`] checks every value, with the [`defaults`] for
//! what is left out, before anything binds a port. Errors name the field
//! (config key and flag). Listeners and their edge settings: [`listeners`];
//! the XDP source filter's interface and allow lists: [`source_filter`].

mod admin;
pub mod defaults;
mod file;
mod listeners;
pub mod options;
mod overlay;
mod reload;
mod source_filter;

pub use admin::AdminConfig;
pub use listeners::ListenerConfig;
pub use options::{DnsFamily, ListenSockets, ListenerOptions, ListenerSettings, LogFormat, Options};
pub use reload::NeedsRestart;
#[cfg(test)]
pub(crate) use source_filter::three_listeners;

use std::{fmt::Display, num::NonZeroUsize, path::PathBuf, str::FromStr, time::Duration};

use serde::{Deserialize, Deserializer};

use crate::{
    connect::ConnectConfig,
    dataplane::{ChosenPlane, DataPlane, packet::SwitchAfter, splice::Pipe},
    dns::DnsConfig,
    sockopt::TcpConfig,
    source_filter::SourceFilterConfig,
};

/// A fully validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listeners: Vec<ListenerConfig>,
    pub dns: DnsConfig,
    pub connect: ConnectConfig,
    pub tcp: TcpConfig,
    pub drain_timeout: Duration,
    /// Admin endpoint, health-check port, drain delay, probe interval.
    pub admin: AdminConfig,
    /// Connections served at once; the sockmap maps are sized for it.
    pub max_connections: usize,
    /// Threads that accept and serve connections.
    pub workers: NonZeroUsize,
    /// One listening socket shared by the workers, one each, or one each
    /// steered by CPU; `None`: chosen at start, once the data plane and the
    /// worker count are known (`defaults::listen_sockets`).
    pub listen_sockets: Option<ListenSockets>,
    /// The plane asked for, what runs when it cannot start, and why.
    pub dataplane: ChosenPlane,
    pub log_format: LogFormat,
    /// The XDP source filter's interfaces, when some listener has an
    /// `xdp_interface` (its own or the top level's); the allow lists are per
    /// listener.
    pub source_filter: Option<SourceFilterConfig>,
    /// Where to hand the listening sockets over on a graceful upgrade.
    pub upgrade_socket: Option<PathBuf>,
    /// Packet plane: the interfaces to attach its program to (`None`: those
    /// of the main routing table).
    pub packet_interfaces: Option<Vec<String>>,
    /// Packet plane: when a connection relayed by hand is joined.
    pub packet_switch_after: SwitchAfter,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: field `{field}`: {message}")]
    Parse { path: PathBuf, field: String, message: String },
    #[error("field `{field}` (--{flag}): {reason}")]
    Invalid { field: &'static str, flag: &'static str, reason: String },
    #[error("listeners[{index}] ({listen}): field `{field}` (--{flag}): {reason}")]
    InvalidListener {
        index: usize,
        listen: std::net::SocketAddr,
        field: &'static str,
        flag: &'static str,
        reason: String,
    },
}

const MIN_COPY_BUFFER: usize = 4 * 1024;
const MAX_COPY_BUFFER: usize = 16 * 1024 * 1024;
/// Linux caps TCP_KEEPIDLE and TCP_KEEPINTVL at 32767 s and TCP_KEEPCNT at 127.
const MAX_KEEPALIVE_SECS: u64 = 32_767;
const MAX_KEEPALIVE_COUNT: u32 = 127;
/// Smallest `max_inflight`: a paused direction resumes once its peer has
/// room for half the bound, and a loopback skb carries up to 64 KiB, so a
/// bound of 64 KiB never resumes (docs/kernel-notes.md, *Facts re-checked*); 256 KiB is
/// the bound the lossy-link and contention gates run (`sockmap-256k`).
const MIN_INFLIGHT: u64 = 256 * 1024;

/// Two sockets per connection must fit the u32 size of a BPF map.
const MAX_CONNECTIONS: usize = 1 << 24;
/// More threads than any host has CPUs for.
const MAX_WORKERS: usize = 1024;

impl Config {
    /// Reads the config file named by `--config` (if any), lays the flags over
    /// it, and validates the result.
    pub fn load(flags: &Options) -> Result<Self, ConfigError> {
        let file = match &flags.config {
            Some(path) => file::read(path)?,
            None => Options::default(),
        };
        Self::from_options(overlay::overlay(file, flags.clone()))
    }

    /// Validates merged options.
    pub fn from_options(o: Options) -> Result<Self, ConfigError> {
        let listeners = listeners::listeners(&o)?;
        let dns = DnsConfig {
            servers: o.dns_servers,
            max_ttl: o.dns_max_ttl.unwrap_or(defaults::DNS_MAX_TTL),
            timeout: positive("dns_timeout", "dns-timeout", o.dns_timeout.unwrap_or(defaults::DNS_TIMEOUT))?,
            family: o.dns_family.unwrap_or(defaults::DNS_FAMILY),
        };
        let connect = ConnectConfig {
            timeout: positive(
                "connect_timeout",
                "connect-timeout",
                o.connect_timeout.unwrap_or(defaults::CONNECT_TIMEOUT),
            )?,
            failed_address_hold: o.failed_address_hold.unwrap_or(defaults::FAILED_ADDRESS_HOLD),
        };
        let tcp = TcpConfig {
            keepalive_idle: keepalive_secs(
                "tcp_keepalive_idle",
                "tcp-keepalive-idle",
                o.tcp_keepalive_idle,
                defaults::TCP_KEEPALIVE_IDLE,
            )?,
            keepalive_interval: keepalive_secs(
                "tcp_keepalive_interval",
                "tcp-keepalive-interval",
                o.tcp_keepalive_interval,
                defaults::TCP_KEEPALIVE_INTERVAL,
            )?,
            keepalive_count: match o.tcp_keepalive_count.unwrap_or(defaults::TCP_KEEPALIVE_COUNT) {
                n @ 1..=MAX_KEEPALIVE_COUNT => n,
                n => {
                    return Err(invalid(
                        "tcp_keepalive_count",
                        "tcp-keepalive-count",
                        format!("{n} is not from 1 to {MAX_KEEPALIVE_COUNT}"),
                    ));
                }
            },
            user_timeout: o.tcp_user_timeout.unwrap_or(defaults::TCP_USER_TIMEOUT),
        };
        if tcp.user_timeout.as_millis() > u128::from(u32::MAX) {
            return Err(invalid("tcp_user_timeout", "tcp-user-timeout", "longer than 49 days"));
        }
        let copy_buffer_size = o.copy_buffer_size.unwrap_or(defaults::COPY_BUFFER_SIZE);
        if !(MIN_COPY_BUFFER..=MAX_COPY_BUFFER).contains(&copy_buffer_size) {
            return Err(invalid(
                "copy_buffer_size",
                "copy-buffer-size",
                format!("{copy_buffer_size} is not from {MIN_COPY_BUFFER} to {MAX_COPY_BUFFER} bytes"),
            ));
        }
        let pipe_size = o.splice_pipe_size.unwrap_or(defaults::SPLICE_PIPE_SIZE);
        let max_connections = o.max_connections.unwrap_or(defaults::MAX_CONNECTIONS);
        if !(1..=MAX_CONNECTIONS).contains(&max_connections) {
            return Err(invalid(
                "max_connections",
                "max-connections",
                format!("{max_connections} is not from 1 to {MAX_CONNECTIONS}"),
            ));
        }
        let workers = match o.workers {
            None => defaults::workers(),
            Some(n) => NonZeroUsize::new(n).filter(|n| n.get() <= MAX_WORKERS).ok_or_else(|| {
                invalid("workers", "workers", format!("{n} is not from 1 to {MAX_WORKERS}"))
            })?,
        };
        let max_inflight = o.max_inflight.unwrap_or(defaults::MAX_INFLIGHT);
        if !(MIN_INFLIGHT..=1 << 30).contains(&max_inflight) {
            return Err(invalid(
                "max_inflight",
                "max-inflight",
                format!("{max_inflight} is not from 256 KiB to 1 GiB"),
            ));
        }
        let admin =
            admin::admin(o.admin_listen, o.health_listen, o.drain_delay, o.probe_interval, &listeners)?;
        let source_filter = source_filter::validate(o.listener.xdp_interface.as_deref(), &listeners)?;
        let dataplane = DataPlane::choose(
            o.dataplane.unwrap_or(defaults::DATAPLANE),
            pipe_size,
            copy_buffer_size,
            max_inflight,
        );
        if let DataPlane::Splice { pipe_size }
        | DataPlane::Sockmap { fallback_pipe_size: pipe_size, .. }
        | DataPlane::Packet { fallback_pipe_size: pipe_size } = dataplane.plane
        {
            // Ask the kernel now, so a size it refuses fails here, not per connection.
            Pipe::new(pipe_size).map_err(|e| {
                invalid("splice_pipe_size", "splice-pipe-size", format!("a pipe of {pipe_size} bytes: {e}"))
            })?;
        }
        if o.listen_sockets == Some(ListenSockets::PerCpu) {
            let cpus = crate::cpus::allowed().map_err(|e| {
                invalid(
                    "listen_sockets",
                    "listen-sockets",
                    format!("per-cpu: the CPUs this process may run on: {e}"),
                )
            })?;
            if workers.get() > cpus.len() {
                return Err(invalid(
                    "workers",
                    "workers",
                    format!(
                        "{workers} workers with listen_sockets per-cpu, which pins one worker to each CPU: \
                         this process may run on {} CPUs",
                        cpus.len()
                    ),
                ));
            }
        }
        Ok(Self {
            listeners,
            dns,
            connect,
            tcp,
            drain_timeout: o.drain_timeout.unwrap_or(defaults::DRAIN_TIMEOUT),
            admin,
            max_connections,
            workers,
            listen_sockets: o.listen_sockets,
            dataplane,
            log_format: o.log_format.unwrap_or(defaults::LOG_FORMAT),
            source_filter,
            upgrade_socket: o.upgrade_socket,
            packet_interfaces: packet_interfaces(o.packet_interfaces)?,
            packet_switch_after: SwitchAfter {
                time: o.packet_switch_after.unwrap_or(defaults::PACKET_SWITCH_AFTER),
                bytes: o.packet_switch_after_bytes.unwrap_or(defaults::PACKET_SWITCH_AFTER_BYTES),
                reads: o.packet_switch_after_reads.unwrap_or(defaults::PACKET_SWITCH_AFTER_READS),
            },
        })
    }
}

/// Interface names as the kernel takes them: not empty, at most 15 bytes,
/// no `/` or white space.
fn packet_interfaces(names: Option<Vec<String>>) -> Result<Option<Vec<String>>, ConfigError> {
    let Some(names) = names else { return Ok(None) };
    for name in &names {
        let bad =
            name.is_empty() || name.len() > 15 || name.contains('/') || name.chars().any(char::is_whitespace);
        if bad {
            return Err(invalid(
                "packet_interfaces",
                "packet-interface",
                format!("{name:?} is not an interface name (1 to 15 bytes, no '/' or spaces)"),
            ));
        }
    }
    if names.is_empty() {
        return Err(invalid("packet_interfaces", "packet-interface", "no interface named".to_owned()));
    }
    Ok(Some(names))
}

/// A bad value: config key, flag, why.
pub(super) struct FieldError(pub &'static str, pub &'static str, pub String);

impl From<FieldError> for ConfigError {
    fn from(FieldError(field, flag, reason): FieldError) -> Self {
        Self::Invalid { field, flag, reason }
    }
}

/// `value`, unless it is zero.
fn positive(field: &'static str, flag: &'static str, value: Duration) -> Result<Duration, FieldError> {
    match value {
        d if d.is_zero() => Err(FieldError(field, flag, "must be longer than 0".into())),
        d => Ok(d),
    }
}

fn keepalive_secs(
    field: &'static str,
    flag: &'static str,
    value: Option<Duration>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let d = value.unwrap_or(default);
    if d.as_secs() == 0 || d.as_secs() > MAX_KEEPALIVE_SECS {
        return Err(invalid(
            field,
            flag,
            format!("{} is not from 1s to {MAX_KEEPALIVE_SECS}s", humantime::format_duration(d)),
        ));
    }
    Ok(d)
}

pub(crate) fn invalid(field: &'static str, flag: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, flag, reason: reason.into() }
}

/// `listen` in the file: one address (`listen = "0.0.0.0:443"`, what most
/// hosts have) or a list of them.
pub(crate) fn de_listen_addrs<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Vec<std::net::SocketAddr>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let texts = match OneOrMany::deserialize(d) {
        Ok(OneOrMany::One(text)) => vec![text],
        Ok(OneOrMany::Many(texts)) => texts,
        Err(_) => return Err(serde::de::Error::custom("expected \"ADDR:PORT\" or a list of them")),
    };
    texts
        .iter()
        .map(|text| {
            text.parse().map_err(|e| serde::de::Error::custom(format!("{text:?} is not ADDR:PORT: {e}")))
        })
        .collect()
}

/// Deserializes an optional value through its `FromStr` (used for `upstream`).
pub(crate) fn de_from_str<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: Display,
{
    let text = String::deserialize(d)?;
    text.parse().map(Some).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, io::Write as _};

    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn load(text: &str, mut flags: Options) -> Result<Config, ConfigError> {
        let f = file(text);
        flags.config = Some(f.path().into());
        Config::load(&flags)
    }

    #[test]
    fn max_inflight_below_256_kib_is_refused_naming_the_flag() {
        let flags = |bytes| Options {
            max_inflight: Some(bytes),
            ..Options::listening("127.0.0.1:6443", "api.example.com:443")
        };
        let error = Config::load(&flags(128 * 1024)).unwrap_err().to_string();
        assert!(error.contains("max-inflight") && error.contains("131072"), "{error}");
        assert!(Config::load(&flags(256 * 1024)).is_ok());
    }

    #[test]
    fn file_values_with_defaults() {
        let c = load(
            "listen = [\"127.0.0.1:6443\"]\nupstream = \"api.example.com:443\"\ndns_max_ttl = \"0s\"\n",
            Options::default(),
        )
        .unwrap();
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.listeners[0].addr, crate::addr::ListenAddr("127.0.0.1:6443".parse().unwrap()));
        let upstream = c.listeners[0].edge.upstreams.default_upstream().unwrap();
        assert_eq!(upstream.to_string(), "api.example.com:443");
        assert_eq!(c.dns.max_ttl, Duration::ZERO);
        assert_eq!(c.dns.family, DnsFamily::Any);
        assert_eq!(c.connect.timeout, Duration::from_secs(3));
        assert_eq!(c.tcp.keepalive_idle, Duration::from_secs(30));
    }

    #[test]
    fn dns_family_from_the_file_and_a_flag_over_it() {
        let file =
            "listen = [\"127.0.0.1:6443\"]\nupstream = \"api.example.com:443\"\ndns_family = \"ipv4\"\n";
        assert_eq!(load(file, Options::default()).unwrap().dns.family, DnsFamily::Ipv4);
        let flags = Options { dns_family: Some(DnsFamily::Ipv6), ..Options::default() };
        assert_eq!(load(file, flags).unwrap().dns.family, DnsFamily::Ipv6);
    }

    #[test]
    fn listen_is_one_address_or_a_list() {
        let upstream = "upstream = \"api.example.com:443\"\n";
        for (listen, expected) in [
            ("\"0.0.0.0:443\"", vec!["0.0.0.0:443"]),
            ("[\"0.0.0.0:443\", \"[::]:443\"]", vec!["0.0.0.0:443", "[::]:443"]),
        ] {
            let c = load(&format!("listen = {listen}\n{upstream}"), Options::default()).unwrap();
            let got: Vec<String> = c.listeners.iter().map(|l| l.addr.0.to_string()).collect();
            assert_eq!(got, expected, "listen = {listen}");
        }
        for (listen, needle) in [("\"nowhere\"", "\"nowhere\" is not ADDR:PORT"), ("443", "ADDR:PORT")] {
            let error = load(&format!("listen = {listen}\n{upstream}"), Options::default()).unwrap_err();
            let error = error.to_string();
            assert!(error.contains("listen") && error.contains(needle), "listen = {listen}: {error}");
        }
    }

    #[test]
    fn per_cpu_with_more_workers_than_cpus_is_refused_naming_both() {
        let cpus = crate::cpus::allowed().unwrap().len();
        let text = "listen = \"127.0.0.1:0\"\nupstream = \"a.example:443\"\nlisten_sockets = \"per-cpu\"\n";
        let error = load(text, Options { workers: Some(cpus + 1), ..Options::default() }).unwrap_err();
        assert!(error.to_string().contains("workers") && error.to_string().contains("per-cpu"), "{error}");
        let c = load(text, Options { workers: Some(cpus), ..Options::default() }).unwrap();
        assert_eq!(c.listen_sockets, Some(ListenSockets::PerCpu));
        let text = "listen = \"127.0.0.1:0\"\nupstream = \"a.example:443\"\n";
        let c = load(text, Options { workers: Some(cpus + 1), ..Options::default() }).unwrap();
        assert_eq!(c.listen_sockets, None, "chosen at start");
    }

    #[test]
    fn flags_override_the_file() {
        let flags = Options {
            listener: ListenerSettings {
                upstream: Some("other.example.com:6443".parse().unwrap()),
                ..ListenerSettings::default()
            },
            connect_timeout: Some(Duration::from_millis(500)),
            ..Options::default()
        };
        let c = load(
            "listen = [\"127.0.0.1:6443\"]\nupstream = \"api.example.com:443\"\nconnect_timeout = \"9s\"\n",
            flags,
        )
        .unwrap();
        let upstream = c.listeners[0].edge.upstreams.default_upstream().unwrap();
        assert_eq!(upstream.to_string(), "other.example.com:6443");
        assert_eq!(c.connect.timeout, Duration::from_millis(500));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                "listen = [\"127.0.0.1:1\"]\nupstream = \"a.com:443\"\nconect_timeout = \"1s\"\n",
                "conect_timeout",
            ),
            ("listen = [\"127.0.0.1:1\"]\nupstream = \"a.com\"\n", "upstream"),
            ("listen = [\"127.0.0.1:1\"]\nupstream = \"a.com:1\"\ndns_max_ttl = \"soon\"\n", "dns_max_ttl"),
            ("listen = [\"127.0.0.1:1\"]\nupstream = \"a.com:1\"\ndns_family = \"ipv5\"\n", "dns_family"),
            ("listen = [\"nowhere\"]\nupstream = \"a.com:1\"\n", "listen"),
            (
                "listen = [\"127.0.0.1:1\"]\nupstream = \"a.com:1\"\ntcp_keepalive_count = 0\n",
                "tcp_keepalive_count",
            ),
            (
                "listen = [\"127.0.0.1:1\"]\nupstream = \"a.com:1\"\nconnect_timeout = \"0s\"\n",
                "connect_timeout",
            ),
            ("upstream = \"a.com:1\"\n", "listen"),
            ("listen = [\"127.0.0.1:1\"]\n", "upstream"),
        ];
        for (text, field) in cases {
            let err = load(text, Options::default()).unwrap_err().to_string();
            assert!(err.contains(&format!("`{field}")), "{text:?} gave {err:?}, not naming {field}");
        }
    }

    const BASE: &str = "listen = [\"127.0.0.1:6443\"]\nupstream = \"a.com:443\"\n";

    #[test]
    fn source_filter_from_file_and_flags() {
        let set = |list: &[&str]| Some(list.iter().map(|p| p.parse().unwrap()).collect());
        let c = load(
            &format!(
                "{BASE}xdp_interface = \"lo\"\nallowed_source_cidrs = [\"192.0.2.0/24\", \"2001:db8::/32\"]\n"
            ),
            Options::default(),
        )
        .unwrap();
        assert_eq!(c.source_filter.unwrap().interfaces, BTreeSet::from(["lo".to_owned()]));
        assert_eq!(c.listeners[0].allowed_sources, set(&["192.0.2.0/24", "2001:db8::/32"]));
        let flags = Options {
            listener: ListenerSettings {
                allowed_source_cidrs: Some(vec!["10.0.0.0/8".parse().unwrap()]),
                ..ListenerSettings::default()
            },
            ..Options::default()
        };
        let c = load(
            &format!("{BASE}xdp_interface = \"lo\"\nallowed_source_cidrs = [\"192.0.2.0/24\"]\n"),
            flags,
        )
        .unwrap();
        assert_eq!(c.listeners[0].allowed_sources, set(&["10.0.0.0/8"]));
        let c = load(BASE, Options::default()).unwrap();
        assert_eq!((c.source_filter, &c.listeners[0].allowed_sources), (None, &None));
    }

    #[test]
    fn source_filter_errors_name_the_field_and_input() {
        let cases = [
            (
                "allowed_source_cidrs = [\"192.0.2.0/24\"]\n",
                "`allowed_source_cidrs` (--allow-source): needs xdp_interface",
            ),
            (
                "xdp_interface = \"nosuch0\"\nallowed_source_cidrs = [\"192.0.2.0/24\"]\n",
                "`xdp_interface` (--xdp-interface): no network interface \"nosuch0\"",
            ),
            ("xdp_interface = \"lo\"\n", "`allowed_source_cidrs` (--allow-source): missing"),
            (
                "xdp_interface = \"lo\"\nallowed_source_cidrs = []\n",
                "`allowed_source_cidrs` (--allow-source): missing",
            ),
            (
                "xdp_interface = \"lo\"\nallowed_source_cidrs = [\"192.0.2.0/24\", \"192.0.2.0/24\"]\n",
                "192.0.2.0/24 is listed twice",
            ),
            (
                "xdp_interface = \"lo\"\nallowed_source_cidrs = [\"192.0.2.1/24\"]\n",
                "`allowed_source_cidrs[0]`",
            ),
            (
                "xdp_interface = \"lo\"\nallowed_source_cidrs = [\"10.0.0.0/8\", \"ten/8\"]\n",
                "\"ten/8\" is not an IP address",
            ),
        ];
        for (text, needle) in cases {
            let err = load(&format!("{BASE}{text}"), Options::default()).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?} gave {err:?}, not {needle:?}");
        }
    }
}
