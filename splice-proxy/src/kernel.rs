//! The kernel programs, embedded in the binary at build time (see build.rs),
//! loaded and attached with aya.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{HashMap, MapData, MapError, PerCpuArray, RingBuf, SockHash},
    programs::{ProgramError, SkSkb},
};
use aya_log::EbpfLogger;
use proxy_common::{Flow, VerdictStats, global, map, program};
use tokio::io::unix::AsyncFd;

use crate::btf::{self, BtfError};

/// The kernel object the build script built (`kernel-build`).
static KERNEL_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("SPLICE_PROXY_EBPF_OBJECT"));

/// SO_COOKIE: the kernel's 64-bit id of a socket, the key of the socket maps.
/// (nix has no wrapper for this option.)
pub fn socket_cookie<F: AsFd>(socket: &F) -> io::Result<u64> {
    crate::sockopt::get(socket, nix::libc::SOL_SOCKET, nix::libc::SO_COOKIE).map(|(cookie, _)| cookie)
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("reading the kernel's BTF: {0}")]
    Btf(#[from] BtfError),
    #[error("loading the kernel object failed: {0}")]
    Load(#[from] EbpfError),
    #[error("the kernel object has no {kind} named {name}")]
    Missing { kind: &'static str, name: &'static str },
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: ProgramError },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    #[error("kernel log ring buffer: {0}")]
    Log(#[from] aya_log::Error),
    #[error("cannot watch a ring buffer: {0}")]
    RingFd(io::Error),
    #[error("reading the socket cookie failed: {0}")]
    Cookie(io::Error),
    #[error("creating the epoll for spliced sockets' FINs failed: {0}")]
    HangupEpoll(io::Error),
}

/// The loaded programs with their maps; dropping it detaches everything.
pub struct KernelPrograms {
    ebpf: Ebpf,
    sockets: SockHash<MapData, u64>,
    flows: HashMap<MapData, u64, Flow>,
    user_bytes: HashMap<MapData, u64, u64>,
    stats: PerCpuArray<MapData, VerdictStats>,
}

impl KernelPrograms {
    /// Loads the object with the kernel-side log level `log_level` and attaches
    /// the verdict program to the socket map.
    /// `max_connections` sizes the socket and flow maps (two entries each).
    pub fn load(log_level: log::LevelFilter, max_connections: usize) -> Result<Self, KernelError> {
        let entries = u32::try_from(max_connections.saturating_mul(2)).unwrap_or(u32::MAX);
        let vmlinux = Path::new(btf::VMLINUX);
        let write_seq = btf::member_offset(vmlinux, "tcp_sock", "write_seq")?;
        let copied_seq = btf::member_offset(vmlinux, "tcp_sock", "copied_seq")?;
        let wmem_queued = btf::member_offset(vmlinux, "sock", "sk_wmem_queued")?;
        let sndbuf = btf::member_offset(vmlinux, "sock", "sk_sndbuf")?;
        let skb_seq =
            btf::member_offset(vmlinux, "sk_buff", "cb")? + btf::member_offset(vmlinux, "tcp_skb_cb", "seq")?;
        let level = log_level as u8;
        let mut ebpf = EbpfLoader::new()
            .override_global(aya_log::LEVEL, &level, true)
            .override_global(global::TCP_SOCK_WRITE_SEQ_OFFSET, &write_seq, true)
            .override_global(global::TCP_SOCK_COPIED_SEQ_OFFSET, &copied_seq, true)
            .override_global(global::SOCK_WMEM_QUEUED_OFFSET, &wmem_queued, true)
            .override_global(global::SOCK_SNDBUF_OFFSET, &sndbuf, true)
            .override_global(global::SKB_TCP_SEQ_OFFSET, &skb_seq, true)
            .map_max_entries(map::SPLICE_SOCKETS, entries)
            .map_max_entries(map::SPLICE_FLOWS, entries)
            .map_max_entries(map::SPLICE_USER_BYTES, entries)
            .map_max_entries(map::PACKET_FLOWS, 1)
            .load(KERNEL_OBJECT)?;
        let sockets: SockHash<MapData, u64> = take_map(&mut ebpf, map::SPLICE_SOCKETS)?;
        let flows: HashMap<MapData, u64, Flow> = take_map(&mut ebpf, map::SPLICE_FLOWS)?;
        let user_bytes: HashMap<MapData, u64, u64> = take_map(&mut ebpf, map::SPLICE_USER_BYTES)?;
        let stats: PerCpuArray<MapData, VerdictStats> = take_map(&mut ebpf, map::VERDICT_STATS)?;
        let name = program::SPLICE_VERDICT;
        let verdict: &mut SkSkb = program_mut(&mut ebpf, name)?;
        verdict.load().map_err(|source| KernelError::Program { name, source })?;
        verdict.attach(sockets.fd()).map_err(|source| KernelError::Program { name, source })?;
        Ok(Self { ebpf, sockets, flows, user_bytes, stats })
    }

    /// Takes the kernel log ring buffer; records go to `logger`.
    pub fn logger<L: log::Log>(&mut self, logger: L) -> Result<EbpfLogger<L>, KernelError> {
        Ok(EbpfLogger::init_with_logger(&mut self.ebpf, logger)?)
    }

    /// Forwards kernel log records to the process's `log` logger (and so to
    /// `tracing`) from a background task.
    pub fn spawn_log_forwarder(&mut self) -> Result<(), KernelError> {
        let logger = self.logger(log::logger())?;
        let mut logger = watch_readable(logger)?;
        tokio::spawn(async move {
            while let Ok(mut guard) = logger.readable_mut().await {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
        Ok(())
    }

    /// Takes the flow event ring buffer, watched for readability.
    pub fn take_events(&mut self) -> Result<AsyncFd<RingBuf<MapData>>, KernelError> {
        let events: RingBuf<MapData> = take_map(&mut self.ebpf, map::SPLICE_EVENTS)?;
        watch_readable(events)
    }

    /// Adds a socket to the splice map; returns its cookie (the map key).
    pub fn insert_socket<F: AsFd + AsRawFd>(&mut self, socket: &F) -> Result<u64, KernelError> {
        let cookie = socket_cookie(socket).map_err(KernelError::Cookie)?;
        self.sockets
            .insert(cookie, socket.as_raw_fd(), 0)
            .map_err(|source| KernelError::Map { name: map::SPLICE_SOCKETS, source })?;
        Ok(cookie)
    }

    /// Cookies of the sockets now in the splice map.
    pub fn socket_cookies(&self) -> Result<Vec<u64>, KernelError> {
        self.sockets
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|source| KernelError::Map { name: map::SPLICE_SOCKETS, source })
    }

    /// Sets the flow whose bytes come from the socket `cookie`.
    pub fn set_flow(&mut self, cookie: u64, flow: &Flow) -> Result<(), KernelError> {
        self.flows
            .insert(cookie, flow, 0)
            .map_err(|source| KernelError::Map { name: map::SPLICE_FLOWS, source })
    }

    /// The flow of socket `cookie`, if there is one.
    pub fn flow(&self, cookie: u64) -> Result<Option<Flow>, KernelError> {
        match self.flows.get(&cookie, 0) {
            Ok(flow) => Ok(Some(flow)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(KernelError::Map { name: map::SPLICE_FLOWS, source }),
        }
    }

    /// Removes the flow of socket `cookie` and its user byte count (absent is fine).
    pub fn remove_flow(&mut self, cookie: u64) -> Result<(), KernelError> {
        let user_bytes = ignore_missing(self.user_bytes.remove(&cookie))
            .map_err(|source| KernelError::Map { name: map::SPLICE_USER_BYTES, source });
        let flow = ignore_missing(self.flows.remove(&cookie))
            .map_err(|source| KernelError::Map { name: map::SPLICE_FLOWS, source });
        user_bytes.and(flow)
    }

    /// Tells the program how many passed bytes of the flow from `cookie` user
    /// space has written to the peer (it resumes splicing once that is all).
    pub fn set_user_bytes(&mut self, cookie: u64, bytes: u64) -> Result<(), KernelError> {
        self.user_bytes
            .insert(cookie, bytes, 0)
            .map_err(|source| KernelError::Map { name: map::SPLICE_USER_BYTES, source })
    }

    /// Number of flows in the map.
    pub fn flow_count(&self) -> usize {
        self.flows.keys().count()
    }

    /// The verdict program's counters, summed over all CPUs.
    pub fn verdict_stats(&self) -> Result<VerdictStats, KernelError> {
        let per_cpu =
            self.stats.get(&0, 0).map_err(|source| KernelError::Map { name: map::VERDICT_STATS, source })?;
        Ok(per_cpu.iter().fold(VerdictStats::default(), |sum, cpu| sum.add(*cpu)))
    }
}

/// A delete of a key that is not there (ENOENT, which aya reports as a
/// syscall error) is not a failure.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(nix::libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// Registers a map's fd with tokio for readability.
fn watch_readable<T: AsRawFd>(inner: T) -> Result<AsyncFd<T>, KernelError> {
    // SAFETY: `inner` owns its map fd for as long as it lives, and `as_raw_fd`
    // always returns that same fd.
    #[allow(unsafe_code)]
    let registered = unsafe { AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE) };
    registered.map_err(|e| KernelError::RingFd(e.into()))
}

pub(crate) fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, KernelError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(KernelError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| KernelError::Map { name, source })
}

/// The program `name` of `ebpf`, as its type `P`.
pub(crate) fn program_mut<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, KernelError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let found = ebpf.program_mut(name).ok_or(KernelError::Missing { kind: "program", name })?;
    found.try_into().map_err(|source| KernelError::Program { name, source })
}

/// [`program_mut`], shared.
pub(crate) fn program<'a, P>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a P, KernelError>
where
    &'a P: TryFrom<&'a aya::programs::Program, Error = ProgramError>,
{
    let found = ebpf.program(name).ok_or(KernelError::Missing { kind: "program", name })?;
    found.try_into().map_err(|source| KernelError::Program { name, source })
}

/// Loads the object for one of its XDP programs: the maps only the verdict
/// program uses get a single entry instead of their compiled-in 65,536 (the
/// hash maps are preallocated: megabytes for nothing).
pub(crate) fn load_for_xdp() -> Result<Ebpf, KernelError> {
    load_for_packets(1, false)
}

/// Loads the object for packet splicing (and the XDP programs): the
/// verdict program's maps get a single entry, the packet flows `flows`;
/// `headers_copied` makes the packet programs copy every packet's headers
/// out (see [`global::PACKET_HEADERS_COPIED`]; tests only).
pub(crate) fn load_for_packets(flows: u32, headers_copied: bool) -> Result<Ebpf, KernelError> {
    Ok(EbpfLoader::new()
        .override_global(global::PACKET_HEADERS_COPIED, &u8::from(headers_copied), true)
        .map_max_entries(map::SPLICE_SOCKETS, 1)
        .map_max_entries(map::SPLICE_FLOWS, 1)
        .map_max_entries(map::SPLICE_USER_BYTES, 1)
        .map_max_entries(map::PACKET_FLOWS, flows)
        .load(KERNEL_OBJECT)?)
}

/// The test helper `lossy_link` attached to one interface (in the calling
/// thread's network namespace); detached on drop. Only tests use it.
pub struct LossyLink {
    _ebpf: Ebpf,
    drops: PerCpuArray<MapData, u64>,
}

impl LossyLink {
    /// About 1 % of the data packets arriving at `interface` dropped.
    pub fn attach(interface: &str) -> Result<Self, KernelError> {
        Self::dropping(interface, 0)
    }

    /// `per_mille` of the data packets arriving at `interface` dropped (1000:
    /// all; 0: about 1 %).
    pub fn dropping(interface: &str, per_mille: u32) -> Result<Self, KernelError> {
        let mut ebpf = load_for_xdp()?;
        let drops: PerCpuArray<MapData, u64> = take_map(&mut ebpf, map::LOSSY_DROPS)?;
        let mut share: aya::maps::Array<MapData, u32> = take_map(&mut ebpf, map::LOSSY_PER_MILLE)?;
        share
            .set(0, per_mille, 0)
            .map_err(|source| KernelError::Map { name: map::LOSSY_PER_MILLE, source })?;
        let name = program::LOSSY_LINK;
        let xdp: &mut aya::programs::Xdp = program_mut(&mut ebpf, name)?;
        xdp.load().map_err(|source| KernelError::Program { name, source })?;
        xdp.attach(interface, aya::programs::XdpMode::Default)
            .map_err(|source| KernelError::Program { name, source })?;
        Ok(Self { _ebpf: ebpf, drops })
    }

    /// Packets dropped so far.
    pub fn drops(&self) -> Result<u64, KernelError> {
        let per_cpu =
            self.drops.get(&0, 0).map_err(|source| KernelError::Map { name: map::LOSSY_DROPS, source })?;
        Ok(per_cpu.iter().sum())
    }
}
