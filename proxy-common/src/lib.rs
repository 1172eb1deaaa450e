//! Names and `#[repr(C)]` types shared by `proxy-ebpf` (kernel) and
//! `splice-proxy` (daemon). Everything here is `no_std`, has a fixed layout, no
//! `bool`, and explicit padding, so both sides read the same bytes.
#![no_std]

pub mod packet;

pub use packet::{PacketFlowKey, PacketRewrite};

/// Names of the programs in the kernel object, as `aya` looks them up.
pub mod program {
    /// `sk_skb/stream_verdict` program attached to [`super::map::SPLICE_SOCKETS`].
    pub const SPLICE_VERDICT: &str = "splice_verdict";
    /// Test helper (XDP): drops about 1 % of IPv4 TCP packets that carry data,
    /// to make retransmissions overlap received data. Never attached by the daemon.
    pub const LOSSY_LINK: &str = "lossy_link";
    /// XDP program of the source filter (`--xdp-interface`): drops TCP packets
    /// to a guarded port whose source is in none of that port's allowed
    /// prefixes, passes the rest.
    pub const SOURCE_FILTER: &str = "source_filter";
    /// tc (clsact ingress) program of packet splicing: rewrites each packet
    /// of a spliced connection into the other connection and sends it out.
    pub const PACKET_SPLICE: &str = "packet_splice";
    /// tc (clsact egress) program of packet splicing: drops what the proxy's
    /// own socket of a spliced connection still sends.
    pub const PACKET_SILENCE: &str = "packet_silence";
}

/// Names of the maps in the kernel object.
pub mod map {
    /// SOCKHASH of the sockets whose skbs the verdict program sees, keyed by socket cookie.
    pub const SPLICE_SOCKETS: &str = "SPLICE_SOCKETS";
    /// Per-CPU array with one [`super::VerdictStats`] slot; user space sums the CPUs.
    pub const VERDICT_STATS: &str = "VERDICT_STATS";
    /// Hash of [`super::Flow`] by the cookie of the socket the bytes come from.
    pub const SPLICE_FLOWS: &str = "SPLICE_FLOWS";
    /// Hash of `u64` by source cookie: bytes of a paused direction that user
    /// space has written to the peer (written only by user space).
    pub const SPLICE_USER_BYTES: &str = "SPLICE_USER_BYTES";
    /// Hash of [`super::PacketRewrite`] by [`super::PacketFlowKey`]: the
    /// packet-splicing program's flows.
    pub const PACKET_FLOWS: &str = "PACKET_FLOWS";
    /// Per-CPU `u64`: packets of the proxy's own spliced sockets that
    /// [`super::program::PACKET_SILENCE`] dropped.
    pub const PACKET_SILENCED: &str = "PACKET_SILENCED";
    /// Hash of `u8` by socket cookie: the proxy's spliced sockets whose
    /// keepalive probe, being sent, [`super::program::PACKET_SILENCE`] lets
    /// out (written only by user space).
    pub const PACKET_PROBES: &str = "PACKET_PROBES";
    /// Ring buffer of [`super::FlowEvent`]s for user space.
    pub const SPLICE_EVENTS: &str = "SPLICE_EVENTS";
    /// Per-CPU `u64`: packets [`super::program::LOSSY_LINK`] dropped.
    pub const LOSSY_DROPS: &str = "LOSSY_DROPS";
    /// Array of one `u32`: the share of data packets
    /// [`super::program::LOSSY_LINK`] drops, in 1/1000 (0: its default).
    pub const LOSSY_PER_MILLE: &str = "LOSSY_PER_MILLE";
    /// LPM trie of allowed IPv4 sources per listen port (key: [`super::SourceKeyV4`],
    /// the port and address in network order; value: `u8`, unused).
    pub const SOURCE_ALLOW_V4: &str = "SOURCE_ALLOW_V4";
    /// LPM trie of allowed IPv6 sources per listen port (key: [`super::SourceKeyV6`]).
    pub const SOURCE_ALLOW_V6: &str = "SOURCE_ALLOW_V6";
    /// Per-CPU hash of the guarded TCP destination ports (host byte order),
    /// each with its [`super::PortFilterStats`]; user space sums the CPUs.
    pub const GUARDED_PORTS: &str = "GUARDED_PORTS";
    /// Per-CPU array with one [`super::SourceFilterStats`] slot; user space sums the CPUs.
    pub const SOURCE_STATS: &str = "SOURCE_STATS";
}

/// Most (listen port, prefix) pairs per address family the configuration
/// may allow, over all listeners.
pub const MAX_SOURCE_PREFIXES: u32 = 1024;

/// Entries of each source trie: every pair once for its port and at most
/// once more under [`ANY_GUARDED_PORT`], and all of that twice, so a reload
/// can add every new entry before it removes the old ones.
pub const SOURCE_TRIE_CAPACITY: u32 = 4 * MAX_SOURCE_PREFIXES;

/// Most TCP ports the source filter can guard (one per listener with a list).
pub const MAX_GUARDED_PORTS: u32 = 64;

/// Bits of a source trie key taken by the port: a key of prefix length
/// `PORT_PREFIX_BITS + n` matches one port and the first `n` address bits.
pub const PORT_PREFIX_BITS: u32 = 16;

/// The pseudo-port under which the tries hold every listener's prefixes
/// together: the filter looks a source up there when it cannot find the TCP
/// header (too many IPv6 extension headers), so a source allowed to any
/// listener passes. TCP port 0 is never a listen port, and is never guarded.
pub const ANY_GUARDED_PORT: u16 = 0;

/// Key data of [`map::SOURCE_ALLOW_V4`] (after the trie's `u32` prefix
/// length): the TCP destination port, then the source address, both in
/// network byte order, so a prefix covers the port before the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceKeyV4 {
    /// TCP destination port, big-endian.
    pub port: [u8; 2],
    /// IPv4 source address.
    pub addr: [u8; 4],
}

/// Key data of [`map::SOURCE_ALLOW_V6`]; see [`SourceKeyV4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceKeyV6 {
    /// TCP destination port, big-endian.
    pub port: [u8; 2],
    /// IPv6 source address.
    pub addr: [u8; 16],
}

/// Per guarded port and CPU: TCP packets to that port the filter passed
/// (allowed source) and dropped; user space sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortFilterStats {
    pub allowed: u64,
    pub dropped: u64,
}

impl PortFilterStats {
    /// Field-wise sum, used to add up the per-CPU values.
    #[must_use]
    pub const fn add(self, other: Self) -> Self {
        Self {
            allowed: self.allowed.wrapping_add(other.allowed),
            dropped: self.dropped.wrapping_add(other.dropped),
        }
    }
}

/// Size of [`map::SPLICE_EVENTS`] in bytes (a power of two, page multiple).
pub const SPLICE_EVENTS_BYTES: u32 = 256 * 1024;

/// One direction of a spliced connection, keyed by the source socket's cookie.
/// User space writes it before inserting the sockets; the program updates the
/// counters and may set `paused`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Cookie of the socket the bytes are redirected to.
    pub peer_cookie: u64,
    /// Bytes redirected to the peer's egress so far.
    pub redirected_bytes: u64,
    /// Bytes passed to the source socket's own queue (while paused), for user space.
    pub passed_bytes: u64,
    /// Pause once more than this many redirected bytes wait to enter the
    /// peer's send queue (they sit, uncharged, on the peer's psock queue).
    pub max_inflight: u64,
    /// The peer's `tcp_sock.write_seq` at this flow's first skb.
    pub peer_write_seq_base: u32,
    /// Nonzero once `peer_write_seq_base` is set.
    pub base_set: u32,
    /// Nonzero: return SK_PASS (user space finishes this direction).
    pub paused: u32,
    /// Why it paused: one of [`pause`].
    pub pause_reason: u32,
    /// TCP sequence number of the next byte this direction expects.
    pub next_seq: u32,
    /// Nonzero once `next_seq` is set (by the first skb).
    pub seq_set: u32,
    /// Times the program paused this direction.
    pub pauses: u32,
    /// Times it resumed splicing after user space had written every passed byte.
    pub resumes: u32,
}

/// Values of [`Flow::pause_reason`] and [`FlowEvent::reason`].
pub mod pause {
    /// Not paused.
    pub const NONE: u32 = 0;
    /// More than `max_inflight` bytes were waiting for the peer. The only
    /// reason the program resumes from: once user space has written every
    /// passed byte and fewer than half of `max_inflight` wait.
    pub const INFLIGHT: u32 = 1;
    /// The peer socket was not in the socket map.
    pub const NO_PEER: u32 = 2;
    /// User space asked for it (set-up failed half-way).
    pub const USER: u32 = 3;
    /// The skb's sequence number could not be read, or the head it shares
    /// with bytes already received could not be cut off: its bytes may repeat
    /// ones already forwarded, so user space resets the connection.
    pub const NO_SEQ: u32 = 4;
}

/// Sent through [`map::SPLICE_EVENTS`] when the program pauses a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// Cookie of the source socket of the paused flow.
    pub cookie: u64,
    /// One of [`pause`].
    pub reason: u32,
    pub _pad: u32,
}

/// Names of the globals user space sets when it loads the object.
pub mod global {
    /// `u32`: byte offset of `write_seq` in the kernel's `struct tcp_sock`.
    pub const TCP_SOCK_WRITE_SEQ_OFFSET: &str = "TCP_SOCK_WRITE_SEQ_OFFSET";
    /// `u32`: byte offset of `copied_seq` in `struct tcp_sock`.
    pub const TCP_SOCK_COPIED_SEQ_OFFSET: &str = "TCP_SOCK_COPIED_SEQ_OFFSET";
    /// `u32`: byte offset of `sk_wmem_queued` in `struct sock` (the start of `struct tcp_sock`).
    pub const SOCK_WMEM_QUEUED_OFFSET: &str = "SOCK_WMEM_QUEUED_OFFSET";
    /// `u32`: byte offset of `sk_sndbuf` in `struct sock`.
    pub const SOCK_SNDBUF_OFFSET: &str = "SOCK_SNDBUF_OFFSET";
    /// `u32`: byte offset of `cb` in `struct sk_buff` plus that of `seq` in
    /// `struct tcp_skb_cb`: where an skb's TCP sequence number is.
    pub const SKB_TCP_SEQ_OFFSET: &str = "SKB_TCP_SEQ_OFFSET";
    /// `u8`: 1 makes `packet_splice` and `packet_silence` copy every
    /// packet's headers out with a helper, their way for headers past the
    /// skb's linear part; 0 (the proxy's) reads headers in place where they
    /// can. Tests set it, to run that way on `BPF_PROG_TEST_RUN`'s frames,
    /// which are always linear.
    pub const PACKET_HEADERS_COPIED: &str = "PACKET_HEADERS_COPIED";
}

/// Compiled-in capacity of [`map::SPLICE_SOCKETS`], [`map::SPLICE_FLOWS`]
/// and [`map::SPLICE_USER_BYTES`]; user space resizes them at load to twice
/// `--max-connections`.
pub const SPLICE_SOCKETS_CAPACITY: u32 = 65_536;

/// Counters the verdict program keeps per CPU; user space adds the CPUs up.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictStats {
    /// skbs the verdict program was run on.
    pub skbs: u64,
    /// Payload bytes in those skbs.
    pub bytes: u64,
    /// Zero-length skbs (a FIN with no data); dropped, the socket still sees the FIN.
    pub empty_skbs: u64,
    /// Bytes redirected to a peer socket.
    pub redirected_bytes: u64,
    /// Bytes passed to the socket's own queue (no flow, or paused).
    pub passed_bytes: u64,
    /// Bytes cut from the head of retransmitted skbs that overlapped bytes
    /// already received (they would otherwise be forwarded twice).
    pub trimmed_bytes: u64,
    /// skbs dropped because every byte in them had been received before.
    pub old_skbs: u64,
    /// Retransmitted skbs whose old head could not be cut off (their
    /// connection is reset; see [`pause::NO_SEQ`]).
    pub trim_failures: u64,
    /// Pause events the ring buffer had no room for (user space then wakes
    /// every direction to read its pause flag).
    pub lost_events: u64,
}

impl VerdictStats {
    /// Field-wise sum, used to add up the per-CPU slots.
    #[must_use]
    pub const fn add(self, other: Self) -> Self {
        Self {
            skbs: self.skbs.wrapping_add(other.skbs),
            bytes: self.bytes.wrapping_add(other.bytes),
            empty_skbs: self.empty_skbs.wrapping_add(other.empty_skbs),
            redirected_bytes: self.redirected_bytes.wrapping_add(other.redirected_bytes),
            passed_bytes: self.passed_bytes.wrapping_add(other.passed_bytes),
            trimmed_bytes: self.trimmed_bytes.wrapping_add(other.trimmed_bytes),
            old_skbs: self.old_skbs.wrapping_add(other.old_skbs),
            trim_failures: self.trim_failures.wrapping_add(other.trim_failures),
            lost_events: self.lost_events.wrapping_add(other.lost_events),
        }
    }
}

/// Packets the source filter saw, by verdict and reason; kept per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceFilterStats {
    /// TCP packets to a guarded port from a source allowed to that port: passed.
    pub allowed: u64,
    /// TCP packets to a guarded port from any other source: dropped. (Also
    /// IPv6 packets whose extension headers are too many to find the TCP
    /// header behind, unless their source is allowed to some guarded port:
    /// they could be for one.)
    pub dropped: u64,
    /// Packets not for a guarded port, passed untouched: not IPv4/IPv6, not
    /// TCP (UDP to the same port too), or TCP to another port.
    pub unguarded: u64,
    /// IP fragments after the first: they carry no port, passed (without
    /// their first fragment they are never reassembled).
    pub fragments: u64,
    /// Packets shorter than their headers say, or with a bad IP version or
    /// header length: passed untouched (the kernel's IP layer drops them).
    pub malformed: u64,
}

impl SourceFilterStats {
    /// Every packet the program passed.
    #[must_use]
    pub const fn passed(&self) -> u64 {
        self.allowed.wrapping_add(self.unguarded).wrapping_add(self.fragments).wrapping_add(self.malformed)
    }

    /// Field-wise sum, used to add up the per-CPU slots.
    #[must_use]
    pub const fn add(self, other: Self) -> Self {
        Self {
            allowed: self.allowed.wrapping_add(other.allowed),
            dropped: self.dropped.wrapping_add(other.dropped),
            unguarded: self.unguarded.wrapping_add(other.unguarded),
            fragments: self.fragments.wrapping_add(other.fragments),
            malformed: self.malformed.wrapping_add(other.malformed),
        }
    }
}

#[cfg(feature = "user")]
#[allow(unsafe_code)]
mod pod {
    // SAFETY: `#[repr(C)]`, made only of `u64`s and `u32`s
    // with explicit padding fields (no implicit padding, no invalid bit
    // patterns), so any byte pattern of their size is a valid value.
    unsafe impl aya::Pod for super::VerdictStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Flow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SourceFilterStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PortFilterStats {}
    // SAFETY: as above: `u64`s, then `u32`s, then `u16`/`u8` fields and
    // arrays that fill every byte up to the next `u64` (no implicit padding).
    unsafe impl aya::Pod for super::PacketRewrite {}
    // SAFETY: `#[repr(C)]` structs of `u8` arrays only (alignment 1, no
    // padding); any bytes are a valid value.
    unsafe impl aya::Pod for super::SourceKeyV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PacketFlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SourceKeyV6 {}
}

#[cfg(test)]
mod tests {
    use super::{
        Flow, FlowEvent, PacketFlowKey, PacketRewrite, PortFilterStats, SourceFilterStats, SourceKeyV4,
        SourceKeyV6, VerdictStats,
    };

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<VerdictStats>(), 9 * 8);
        assert_eq!(core::mem::size_of::<SourceFilterStats>(), 5 * 8);
        assert_eq!(core::mem::size_of::<Flow>(), 4 * 8 + 8 * 4);
        assert_eq!(core::mem::size_of::<FlowEvent>(), 8 + 2 * 4);
        assert_eq!(core::mem::align_of::<Flow>(), 8);
        assert_eq!(core::mem::size_of::<PortFilterStats>(), 2 * 8);
        assert_eq!(core::mem::size_of::<SourceKeyV4>(), 2 + 4);
        assert_eq!(core::mem::size_of::<PacketFlowKey>(), 4 + 4 + 2 + 2);
        // 12 tuple bytes, 5 u32s, 12 MAC bytes, 2 scales, flags: 48; 2 u64s;
        // 2 u32s; a u64; 2 u32s; 3 u64s.
        assert_eq!(core::mem::size_of::<PacketRewrite>(), 48 + 2 * 8 + 2 * 4 + 8 + 2 * 4 + 4 * 8);
        assert_eq!(core::mem::size_of::<SourceKeyV6>(), 2 + 16);
        assert_eq!(core::mem::align_of::<SourceKeyV6>(), 1);
    }

    #[test]
    fn add_sums_each_field() {
        let a =
            VerdictStats { skbs: 1, bytes: 10, redirected_bytes: 7, passed_bytes: 3, ..Default::default() };
        let b = VerdictStats {
            skbs: 2,
            bytes: 5,
            empty_skbs: 1,
            trimmed_bytes: 4,
            old_skbs: 1,
            trim_failures: 1,
            lost_events: 2,
            ..Default::default()
        };
        assert_eq!(
            a.add(b),
            VerdictStats {
                skbs: 3,
                bytes: 15,
                empty_skbs: 1,
                redirected_bytes: 7,
                passed_bytes: 3,
                trimmed_bytes: 4,
                old_skbs: 1,
                trim_failures: 1,
                lost_events: 2
            }
        );
    }

    #[test]
    fn source_filter_stats_sum_and_passed() {
        let a = SourceFilterStats { allowed: 3, dropped: 2, unguarded: 1, ..Default::default() };
        let b = SourceFilterStats { allowed: 1, fragments: 4, malformed: 5, ..Default::default() };
        let sum = a.add(b);
        assert_eq!(
            sum,
            SourceFilterStats { allowed: 4, dropped: 2, unguarded: 1, fragments: 4, malformed: 5 }
        );
        assert_eq!(sum.passed(), 4 + 1 + 4 + 5);
    }
}
