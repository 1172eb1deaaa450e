//! The `packet_splice` (ingress) and `packet_silence` (egress) tc programs
//! and their flow map, loaded from the embedded object on their own (the
//! sockmap maps get one entry each).

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray},
    programs::{SchedClassifier, TcAttachType, TestRun as _, TestRunOptions, tc::SchedClassifierLink},
};
use proxy_common::{PacketFlowKey, PacketRewrite, map, program};

use crate::kernel::{self, KernelError};

/// Longest frame [`PacketProgram::test_run`] returns.
const MAX_FRAME: usize = 2048;

/// The loaded programs, their map of flows, and the interfaces they are
/// attached to (detached when this is dropped, or when the process exits).
pub struct PacketProgram {
    /// Declared first: dropped (detached) before the programs are unloaded.
    links: Vec<(SchedClassifierLink, String)>,
    flows: HashMap<MapData, PacketFlowKey, PacketRewrite>,
    silenced: PerCpuArray<MapData, u64>,
    probes: HashMap<MapData, u64, u8>,
    ebpf: Ebpf,
}

impl std::fmt::Debug for PacketProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketProgram").field("attached", &self.attached().collect::<Vec<_>>()).finish()
    }
}

impl PacketProgram {
    /// Loads the program with room for `max_connections` spliced connections
    /// (two flows each); attaches nothing.
    pub fn load(max_connections: usize) -> Result<Self, KernelError> {
        Self::load_as(max_connections, false)
    }

    /// [`Self::load`], with every packet's headers copied out by a helper,
    /// the programs' way for headers past the skb's linear part. Only tests
    /// use it: `BPF_PROG_TEST_RUN`'s frames are linear, so they reach that
    /// way only like this.
    pub fn load_copying_headers(max_connections: usize) -> Result<Self, KernelError> {
        Self::load_as(max_connections, true)
    }

    fn load_as(max_connections: usize, headers_copied: bool) -> Result<Self, KernelError> {
        let entries = u32::try_from(max_connections.saturating_mul(2)).unwrap_or(u32::MAX);
        let mut ebpf = kernel::load_for_packets(entries, headers_copied)?;
        let flows = kernel::take_map(&mut ebpf, map::PACKET_FLOWS)?;
        let silenced = kernel::take_map(&mut ebpf, map::PACKET_SILENCED)?;
        let probes = kernel::take_map(&mut ebpf, map::PACKET_PROBES)?;
        let mut loaded = Self { links: Vec::new(), flows, silenced, probes, ebpf };
        for name in [program::PACKET_SPLICE, program::PACKET_SILENCE] {
            loaded.program_mut(name)?.load().map_err(|source| KernelError::Program { name, source })?;
        }
        Ok(loaded)
    }

    fn program_mut(&mut self, name: &'static str) -> Result<&mut SchedClassifier, KernelError> {
        kernel::program_mut(&mut self.ebpf, name)
    }

    /// Attaches `packet_splice` at the ingress of `interface` and
    /// `packet_silence` at its egress (in the calling thread's network
    /// namespace). On Linux 6.6 and later those are TCX links, which go away
    /// with this value or the process; on older kernels tc filters under a
    /// `clsact` qdisc, added here when missing.
    pub fn attach(&mut self, interface: &str) -> Result<(), KernelError> {
        for (name, direction) in
            [(program::PACKET_SPLICE, TcAttachType::Ingress), (program::PACKET_SILENCE, TcAttachType::Egress)]
        {
            let classifier = self.program_mut(name)?;
            let id = match classifier.attach(interface, direction) {
                Ok(id) => id,
                Err(_) => {
                    // Before TCX: the filter needs the qdisc (an existing one is fine).
                    let _ = aya::programs::tc::qdisc_add_clsact(interface);
                    classifier
                        .attach(interface, direction)
                        .map_err(|source| KernelError::Program { name, source })?
                }
            };
            let link = classifier.take_link(id).map_err(|source| KernelError::Program { name, source })?;
            self.links.push((link, interface.to_owned()));
        }
        Ok(())
    }

    /// Packets of the proxy's own spliced sockets dropped on their way out.
    pub fn silenced(&self) -> Result<u64, KernelError> {
        let per_cpu = self
            .silenced
            .get(&0, 0)
            .map_err(|source| KernelError::Map { name: map::PACKET_SILENCED, source })?;
        Ok(per_cpu.iter().sum())
    }

    /// The interfaces the programs are attached to, in the order attached.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        // Two links per interface, one each way.
        self.links.iter().step_by(2).map(|(_, interface)| interface.as_str())
    }

    /// Packets arriving with `key` are rewritten by `rewrite` from now on.
    pub fn set_flow(&mut self, key: &PacketFlowKey, rewrite: &PacketRewrite) -> Result<(), KernelError> {
        self.flows
            .insert(key, rewrite, 0)
            .map_err(|source| KernelError::Map { name: map::PACKET_FLOWS, source })
    }

    /// Lets out what `send` makes the spliced socket of `cookie` send, if it
    /// is a pure ACK (a keepalive probe): `packet_silence` drops everything
    /// else it sends. The egress program runs within the send, so the
    /// permission ends with `send`.
    pub fn let_probe_out<E>(
        &mut self,
        cookie: u64,
        send: impl FnOnce() -> Result<(), E>,
    ) -> Result<Result<(), E>, KernelError> {
        let map_error = |source| KernelError::Map { name: map::PACKET_PROBES, source };
        self.probes.insert(cookie, 1, 0).map_err(map_error)?;
        let sent = send();
        self.probes.remove(&cookie).map_err(map_error)?;
        Ok(sent)
    }

    /// The flow map's descriptor, for the reset helper.
    #[must_use]
    pub fn flows_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use aya::maps::IterableMap as _;
        use std::os::fd::AsFd as _;
        self.flows.map().fd().as_fd()
    }

    /// The flow of `key` with its counters, if there is one.
    pub fn flow(&self, key: &PacketFlowKey) -> Result<Option<PacketRewrite>, KernelError> {
        match self.flows.get(key, 0) {
            Ok(rewrite) => Ok(Some(rewrite)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(KernelError::Map { name: map::PACKET_FLOWS, source }),
        }
    }

    /// Packets with `key` pass untouched from now on.
    pub fn remove_flow(&mut self, key: &PacketFlowKey) -> Result<(), KernelError> {
        match self.flows.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            // aya 0.14 reports a missing key as the syscall's ENOENT.
            Err(aya::maps::MapError::SyscallError(error))
                if error.io_error.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(())
            }
            Err(source) => Err(KernelError::Map { name: map::PACKET_FLOWS, source }),
        }
    }

    /// Runs the program once on `frame` (an Ethernet frame) with
    /// BPF_PROG_TEST_RUN: its verdict (a `TC_ACT_*` value) and the frame as
    /// it left the program. Counters count it like a received packet. For
    /// tests.
    pub fn test_run(&self, frame: &[u8]) -> Result<(u32, Vec<u8>), KernelError> {
        let name = program::PACKET_SPLICE;
        let mut out = vec![0u8; MAX_FRAME];
        let opts =
            TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..TestRunOptions::default() };
        let result = kernel::program::<SchedClassifier>(&self.ebpf, name)?
            .test_run(opts)
            .map_err(|source| KernelError::Program { name, source })?;
        out.truncate(usize::try_from(result.data_size_out).unwrap_or(MAX_FRAME));
        Ok((result.return_value, out))
    }
}
