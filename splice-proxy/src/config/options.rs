//! What the command line and the config file set: one [`Options`] shape
//! for both (the flags are laid over the file, see `overlay`), with the
//! keys of one listener declared once in [`ListenerSettings`]. Defaults
//! are not written here: `Config` applies them from [`super::defaults`],
//! which `--help` prints too.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, ValueEnum};
use serde::Deserialize;

use crate::{
    addr::UpstreamTarget,
    dataplane::DataPlaneChoice,
    edge::{ChainedHeaders, ProxyProtocolMode, Route},
    source_filter::prefix::SourcePrefix,
};

/// Options of the proxy; each is optional here because the config file may set
/// it. The same struct is read from the TOML file (see `file`).
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// TOML config file; flags given on the command line override its values.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Address to accept client connections on; repeat for several listeners.
    #[arg(long = "listen", value_name = "ADDR:PORT")]
    #[serde(default, deserialize_with = "super::de_listen_addrs")]
    pub listen: Vec<SocketAddr>,

    /// Listeners with settings of their own (config file only, `[[listeners]]`;
    /// read apart from the other keys, see `file`).
    #[arg(skip)]
    #[serde(skip)]
    pub listeners: Vec<ListenerOptions>,

    /// The keys a `[[listeners]]` entry may set too, at the top level: the
    /// values of the `--listen` listeners and of every entry that leaves one
    /// out (read apart from the other keys, see `file`).
    #[command(flatten)]
    #[serde(skip)]
    pub listener: ListenerSettings,

    /// DNS server to query; repeat for several. Default: the system resolver
    /// configuration (/etc/resolv.conf).
    #[arg(long = "dns-server", value_name = "ADDR:PORT")]
    #[serde(default)]
    pub dns_servers: Vec<SocketAddr>,

    /// Longest time a DNS answer may be reused, whatever its TTL; 0 = a fresh
    /// query for every connection.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub dns_max_ttl: Option<Duration>,

    /// Time allowed for one upstream name resolution.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub dns_timeout: Option<Duration>,

    /// Which records a lookup asks for: `any`, A and AAAA at once (IPv4
    /// addresses tried first); `ipv4`, A only; `ipv6`, AAAA only. In a VPC
    /// without IPv6, `ipv4` saves a query for every lookup.
    #[arg(long, value_enum, value_name = "FAMILY")]
    pub dns_family: Option<DnsFamily>,

    /// Time allowed for connecting to one upstream address before the next is
    /// tried.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,

    /// How long an upstream address that just failed is tried only after all
    /// others.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub failed_address_hold: Option<Duration>,

    /// After SIGTERM, how long open connections may go on before they are
    /// closed.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub drain_timeout: Option<Duration>,

    /// After SIGTERM, how long the proxy goes on accepting new connections
    /// while it already reports not ready (/readyz 503, health port closed),
    /// so the NLB deregisters it before the listeners close. Sized for an NLB
    /// health check of 10 s × 3 failures. A second SIGTERM ends it early.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub drain_delay: Option<Duration>,

    /// Address of the admin HTTP endpoint: /metrics (Prometheus text),
    /// /healthz, /readyz, /debug/connections. Port 0 = any free port (logged).
    #[arg(long, value_name = "ADDR:PORT")]
    pub admin_listen: Option<SocketAddr>,

    /// Plain TCP health-check port for NLB TCP health checks: it accepts (and
    /// closes at once) only while the proxy is ready, and is closed otherwise,
    /// from the first moment of a drain on. [default: off]
    #[arg(long, value_name = "ADDR:PORT")]
    pub health_listen: Option<SocketAddr>,

    /// Time between background probes of each upstream (resolve, then a TCP
    /// connect that is closed at once). The proxy is ready while, for every
    /// upstream, a resolution and a connect succeeded within three intervals.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub probe_interval: Option<Duration>,

    /// Idle time before the first TCP keepalive probe, on both sockets. Keep it
    /// well under the NLB's 350 s idle timeout.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub tcp_keepalive_idle: Option<Duration>,

    /// Time between TCP keepalive probes.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub tcp_keepalive_interval: Option<Duration>,

    /// Unanswered keepalive probes before the connection is dropped.
    #[arg(long, value_name = "N")]
    pub tcp_keepalive_count: Option<u32>,

    /// TCP_USER_TIMEOUT: how long sent data may stay unacknowledged before the
    /// connection is dropped; 0 = the kernel default.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub tcp_user_timeout: Option<Duration>,

    /// How the bytes of an established connection are moved: `auto` runs
    /// splice and logs why (sockmap was seen to forward data twice on a busy
    /// host); `sockmap` and `packet` need the kernel programs (root, or
    /// CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON; a kernel with BTF) and refuse
    /// to start without them.
    #[arg(long, value_enum, value_name = "PLANE")]
    pub dataplane: Option<DataPlaneChoice>,

    /// Largest pipe per direction for the splice data plane (at most
    /// /proc/sys/fs/pipe-max-size unless root): a pipe is made at the
    /// direction's first byte with 64 KiB and doubles each time a splice
    /// fills it.
    #[arg(long, value_name = "BYTES")]
    pub splice_pipe_size: Option<usize>,

    /// Connections served at once; when all are in use, new connections wait
    /// in the listen backlog (logged). The sockmap plane's maps are sized for
    /// it.
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,

    /// Threads that accept and serve connections, each with an event loop of
    /// its own: a connection is served to its end on the thread that
    /// accepted it, never handed between threads. By default one per CPU
    /// the process may use (its affinity and cgroup CPU quota). From 1 to 1024.
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,

    /// How the workers accept: `shared`, one listening socket per listener
    /// that every worker accepts on (a new connection wakes every idle
    /// worker, and whichever is free takes it); `per-worker`, an
    /// SO_REUSEPORT socket per worker (the kernel picks one by a hash of the
    /// connection's addresses and wakes only its worker, which takes it even
    /// when another worker is idle); `per-cpu`, a socket per worker, each
    /// worker pinned to one of the CPUs the process may run on, and each new
    /// connection given to the worker on the CPU its SYN came in on (at most
    /// one worker per CPU). Fixed until a restart.
    #[arg(long, value_enum, value_name = "MODE")]
    pub listen_sockets: Option<ListenSockets>,

    /// Sockmap plane: bytes one direction may have redirected but not yet in the
    /// peer's send queue (the kernel queues them without limit); beyond it, or
    /// beyond what the peer's send queue has room for, the direction is paused:
    /// TCP slows the sender and user space copies until it has caught up, then
    /// the kernel splices again. Also sets both sockets' buffers (clamped to
    /// 1-16 MiB, doubled by the kernel). From 256 KiB to 1 GiB.
    #[arg(long, value_name = "BYTES")]
    pub max_inflight: Option<u64>,

    /// Packet plane: an interface to attach the packet-splicing program to
    /// (at its ingress); repeat, or separate with commas, for several. By
    /// default every interface that carries a route of the main table, so
    /// both the clients' and the upstreams' packets are seen. A connection
    /// whose packets arrive elsewhere stays on the next plane.
    #[arg(long = "packet-interface", value_name = "IF", value_delimiter = ',')]
    pub packet_interfaces: Option<Vec<String>>,

    /// Packet plane: a connection is relayed by the proxy until it has lived
    /// this long (or carried --packet-switch-after-bytes), and only then
    /// joined in the program: a short connection (a kubectl request) ends
    /// without the switch's cost, a long one (a watch, a stream) is carried
    /// by the program. 0 joins every connection at once.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub packet_switch_after: Option<Duration>,

    /// Packet plane: bytes (both directions) after which a connection
    /// relayed by the proxy is joined in the program, if it has not lived
    /// --packet-switch-after yet. 0 joins every connection at once.
    #[arg(long, value_name = "BYTES")]
    pub packet_switch_after_bytes: Option<u64>,

    /// Packet plane: reads that returned data (both directions) after which
    /// a connection relayed by the proxy is joined in the program, if it has
    /// not lived --packet-switch-after yet: a chatty connection (many small
    /// messages, two system calls each by hand) is joined early. 0 joins
    /// every connection at once.
    #[arg(long, value_name = "N")]
    pub packet_switch_after_reads: Option<u64>,

    /// Largest buffer per direction for the userspace copy data plane: it is
    /// allocated at the direction's first byte with 16 KiB and doubles each
    /// time a read fills it.
    #[arg(long, value_name = "BYTES")]
    pub copy_buffer_size: Option<usize>,

    /// Log format on standard error. Filter with RUST_LOG (default `info`).
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Unix socket for graceful upgrades. A process started with it takes the
    /// listening sockets (and the admin endpoint's) over from the process
    /// listening there, if any, which then stops accepting and drains; then
    /// it listens there itself. SIGUSR2 makes a running proxy start its
    /// binary again (the same path and flags: a new build installed there)
    /// to do exactly that.
    #[arg(long, value_name = "PATH")]
    pub upgrade_socket: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListenSockets {
    /// One socket per listener, every worker accepting on it.
    #[default]
    Shared,
    /// An SO_REUSEPORT group per listener, a socket per worker.
    PerWorker,
    /// A socket per worker, each worker pinned to a CPU of its own, and a
    /// new connection put in the socket of the worker on the CPU its SYN
    /// came in on.
    PerCpu,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsFamily {
    /// A and AAAA records, asked at once; IPv4 addresses first.
    #[default]
    Any,
    /// A records only.
    Ipv4,
    /// AAAA records only.
    Ipv6,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The keys of one listener: at the top level (flags or file) for the
/// `--listen` addresses, and in each `[[listeners]]` entry, which takes the
/// top-level value of every key it leaves out. Declared once, here: `None`
/// is "not given", so one [`ListenerSettings::over`] merges flags over the
/// file and an entry over the top level.
#[derive(Debug, Default, Clone, PartialEq, Eq, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSettings {
    /// Upstream to forward to. A DNS name is resolved again for every new
    /// connection (A and AAAA); an IP literal is used as it is.
    #[arg(long, value_name = "HOST:PORT")]
    #[serde(default, deserialize_with = "super::de_from_str")]
    pub upstream: Option<UpstreamTarget>,

    /// Whether connections start with a PROXY protocol header (an NLB with
    /// proxy protocol v2 on sends one): `off`; `optional`, read when there;
    /// `required`, a connection without a valid header is closed. The client
    /// address in the header is the one logged.
    #[arg(long, value_enum, value_name = "MODE")]
    pub proxy_protocol: Option<ProxyProtocolMode>,

    /// Also accept v1 (text) PROXY headers, checked as strictly as v2.
    #[arg(long, num_args = 0, default_missing_value = "true")]
    pub proxy_protocol_v1: Option<bool>,

    /// A second PROXY header right after the first (proxies chained):
    /// `refuse` closes the connection; `strip` reads and drops up to three
    /// more, believing only the first.
    #[arg(long, value_enum, value_name = "POLICY")]
    pub chained_proxy_headers: Option<ChainedHeaders>,

    /// Time for the whole PROXY header to arrive.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub proxy_header_timeout: Option<Duration>,

    /// VPC endpoint ID (vpce-...) allowed to connect, from the AWS TLV of the
    /// PROXY header; repeat for several. When set, a connection from another
    /// endpoint or without the TLV is closed. Needs --proxy-protocol.
    #[arg(long = "allow-vpce", value_name = "ID")]
    pub allowed_vpce_ids: Option<Vec<String>>,

    /// Server name (SNI) of the ClientHello allowed to the upstream; repeat
    /// for several. A ClientHello for another name, or not TLS, is closed.
    /// [default: the upstream's host name]
    #[arg(long = "allow-sni", value_name = "NAME")]
    pub allowed_sni: Option<Vec<String>>,

    /// No SNI check: the first bytes are not looked at and may be any
    /// protocol (plain TCP, benchmarks). Config key: `sni_check = false`.
    #[arg(long = "no-sni-check", num_args = 0, default_missing_value = "false")]
    pub sni_check: Option<bool>,

    /// Send a server name to its own upstream (a routed name is allowed);
    /// repeat for several. Config key: `routes = { "NAME" = "HOST:PORT" }`.
    #[arg(long = "route", value_name = "SNI=HOST:PORT")]
    #[serde(default, deserialize_with = "crate::edge::routes::de_routes_opt")]
    pub routes: Option<Vec<Route>>,

    /// Time for the whole TLS ClientHello to arrive, from the end of the PROXY
    /// header (or from accept).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub client_hello_timeout: Option<Duration>,

    /// Network interface to attach the XDP source filter to: TCP packets
    /// that arrive there for the port of a listener with an allow list are
    /// dropped unless their source is in one of that listener's prefixes;
    /// everything else passes. Native XDP when the driver supports it,
    /// generic otherwise; detached when the proxy exits. In the config file
    /// each [[listeners]] entry may set its own `xdp_interface` (else it
    /// takes this one); the filter is attached to every interface named.
    #[arg(long, value_name = "IF")]
    pub xdp_interface: Option<String>,

    /// Source prefix the XDP source filter lets through to the listen ports
    /// (IPv4 or IPv6 CIDR; a bare address is one host); repeat for several.
    /// Needs --xdp-interface. In the config file each [[listeners]] entry may
    /// have its own `allowed_source_cidrs` (else it takes this one); a
    /// listener with no list is not filtered. SIGHUP reloads the lists from
    /// the config file without a restart.
    #[arg(long = "allow-source", value_name = "CIDR")]
    pub allowed_source_cidrs: Option<Vec<SourcePrefix>>,
}

impl ListenerSettings {
    /// These settings, with `below`'s for every key not given here.
    #[must_use]
    pub fn over(self, below: &Self) -> Self {
        let Self {
            upstream,
            proxy_protocol,
            proxy_protocol_v1,
            chained_proxy_headers,
            proxy_header_timeout,
            allowed_vpce_ids,
            allowed_sni,
            sni_check,
            routes,
            client_hello_timeout,
            xdp_interface,
            allowed_source_cidrs,
        } = self;
        Self {
            upstream: upstream.or_else(|| below.upstream.clone()),
            proxy_protocol: proxy_protocol.or(below.proxy_protocol),
            proxy_protocol_v1: proxy_protocol_v1.or(below.proxy_protocol_v1),
            chained_proxy_headers: chained_proxy_headers.or(below.chained_proxy_headers),
            proxy_header_timeout: proxy_header_timeout.or(below.proxy_header_timeout),
            allowed_vpce_ids: allowed_vpce_ids.or_else(|| below.allowed_vpce_ids.clone()),
            allowed_sni: allowed_sni.or_else(|| below.allowed_sni.clone()),
            sni_check: sni_check.or(below.sni_check),
            routes: routes.or_else(|| below.routes.clone()),
            client_hello_timeout: client_hello_timeout.or(below.client_hello_timeout),
            xdp_interface: xdp_interface.or_else(|| below.xdp_interface.clone()),
            allowed_source_cidrs: allowed_source_cidrs.or_else(|| below.allowed_source_cidrs.clone()),
        }
    }
}

/// One `[[listeners]]` entry of the config file: its address and its own
/// settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerOptions {
    pub listen: SocketAddr,
    /// Read apart from `listen` (see `file`).
    #[serde(skip)]
    pub settings: ListenerSettings,
}

#[cfg(test)]
impl Options {
    /// For tests: one listener on `listen` forwarding to `upstream`.
    pub(crate) fn listening(listen: &str, upstream: &str) -> Self {
        Self {
            listen: vec![listen.parse().expect("ADDR:PORT")],
            listener: ListenerSettings {
                upstream: Some(upstream.parse().expect("HOST:PORT")),
                ..ListenerSettings::default()
            },
            ..Self::default()
        }
    }
}
