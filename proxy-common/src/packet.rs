//! Types of the packet-splicing program (`packet_splice`, tc): one
//! [`PacketRewrite`] per direction of a spliced connection, keyed by the
//! four-tuple its packets arrive with ([`PacketFlowKey`]). IPv4.

/// The four-tuple of packets arriving for one of the proxy's sockets
/// (peer → proxy), every field as on the wire (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PacketFlowKey {
    /// The peer's address (the packet's source).
    pub remote_addr: [u8; 4],
    /// The proxy's address (the packet's destination).
    pub local_addr: [u8; 4],
    pub remote_port: [u8; 2],
    pub local_port: [u8; 2],
}

/// How the packets of one direction become packets of the other connection.
/// User space writes it at the switch; the program adds to the counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketRewrite {
    /// The other connection's four-tuple as the proxy's socket there sends
    /// it: source (the proxy's address and port), destination (that peer's).
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    /// Added (modulo 2³²) to the sequence number.
    pub seq_delta: u32,
    /// Added to the acknowledgement number and to every SACK block edge.
    pub ack_delta: u32,
    /// Added to the timestamp option's TSval.
    pub tsval_delta: u32,
    /// Added to the timestamp option's TSecr.
    pub tsecr_delta: u32,
    /// Interface the rewritten packet leaves by.
    pub ifindex: u32,
    /// Ethernet source and destination of the rewritten packet.
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// Window scale of the packet's sender and of its new receiver: the
    /// window field is rescaled when they differ (capped at 65,535).
    pub sender_wscale: u8,
    pub receiver_wscale: u8,
    /// [`rewrite_flags`].
    pub flags: u16,
    /// Packets rewritten, retransmissions included (the program adds).
    pub packets: u64,
    /// Payload bytes carried, each once: how far `next_seq` moved.
    pub bytes: u64,
    /// Nonzero once a FIN went through, or a RST numbered from what its
    /// receiver acknowledged to the sender's next byte (the program sets).
    pub fin_seen: u32,
    pub rst_seen: u32,
    /// The sender's sequence number after the furthest payload byte seen,
    /// in the low 32 bits (user space starts it at the switch; the program
    /// moves it forward by a compare-and-swap, and the BPF target's atomics
    /// are 64-bit).
    pub next_seq: u64,
    /// While [`rewrite_flags::HOLD`]: the newest TSval the peer sent (the
    /// program records it, with the hop back to the peer in `ifindex`,
    /// `src_mac` (the proxy's) and `dst_mac` (the peer's or its router's)).
    pub peer_tsval: u32,
    /// The sequence number of the FIN, once one went through (its sender's
    /// numbering).
    pub fin_seq: u32,
    /// The cookie of the proxy's socket these packets arrived for before the
    /// switch: once the flow is spliced, what that socket still sends is
    /// dropped on its way out (`packet_silence`).
    pub socket_cookie: u64,
    /// The furthest acknowledgement these packets carried, rewritten (in
    /// the other direction's sender's numbering), in the low 32 bits: the
    /// other direction's FIN has reached its peer once this passes it.
    pub acked: u64,
    /// Packets that repeat what was already sent: retransmissions, and the
    /// window and keepalive probes (one byte before `next_seq`, no data).
    /// Their sender is waiting for an answer.
    pub repeats: u64,
    /// RSTs among `packets`, whatever their number: a keepalive probe to an
    /// end whose socket is gone draws one, which is no sign of life.
    pub resets: u64,
}

/// Bits of [`PacketRewrite::flags`].
pub mod rewrite_flags {
    /// The packets carry the timestamp option (both connections negotiated it).
    pub const TIMESTAMPS: u16 = 1;
    /// Overwrite SACK options with NOPs (one connection did not negotiate SACK).
    pub const STRIP_SACK: u16 = 2;
    /// The switch is under way: data, FIN and SYN segments are dropped (their
    /// senders retransmit them), pure ACKs and RSTs reach the proxy's socket;
    /// every packet teaches the entry the hop back to its sender and the
    /// sender's newest TSval. Nothing is rewritten.
    pub const HOLD: u16 = 4;
    /// The flow has ended: its late packets are dropped, so they neither
    /// reach a peer nor draw a RST from the proxy's stack.
    pub const ENDED: u16 = 8;
    /// The switch waits for both sockets to be quiescent: every packet
    /// reaches the proxy's socket and teaches the entry the hop back to its
    /// sender and the sender's newest TSval, as under [`HOLD`]. Nothing is
    /// dropped or rewritten, so the hold, which drops, lasts only for the
    /// last reads of the sockets.
    pub const WATCH: u16 = 16;
    /// The connection has ended (the proxy saw it), the entry still
    /// rewrites: a SYN with its four-tuple is a new connection (a client
    /// reusing its port), so the program forgets this entry, marks the
    /// other direction's [`ENDED`] and lets the SYN on to the listener.
    pub const FINISHED: u16 = 32;
}

/// Compiled-in capacity of [`super::map::PACKET_FLOWS`] (two entries per
/// connection); user space resizes it at load to four times
/// `--max-connections` (spliced flows and those retiring).
pub const PACKET_FLOWS_CAPACITY: u32 = 65_536;

/// Capacity of [`super::map::PACKET_PROBES`]: user space sends one probe at
/// a time.
pub const PACKET_PROBES_CAPACITY: u32 = 16;
