//! `packet_splice` (tc, clsact ingress): the packets of one TCP connection
//! of the proxy become packets of the other. For an IPv4 TCP packet whose
//! four-tuple has a [`PacketRewrite`] in `PACKET_FLOWS`, it rewrites the
//! Ethernet addresses, the IP addresses and ports (the other connection's,
//! as the proxy's socket there sends them), the sequence and acknowledgement
//! numbers and SACK edges (one offset each per direction), the timestamp
//! option, and the window when the two connections scale it differently;
//! every checksum through `bpf_l3_csum_replace` / `bpf_l4_csum_replace`,
//! which keep CHECKSUM_PARTIAL packets right. Then it redirects the packet
//! out of the flow's interface. Other packets pass untouched.
//!
//! "Pass" is `TC_ACT_UNSPEC`, never `TC_ACT_OK`: on a TCX hook it means
//! "next", so the programs after this one (a CNI's, or a second proxy's
//! during a graceful upgrade, with flows of its own) still see the packet,
//! and it goes up the stack after the last; `TC_ACT_OK` would end the chain
//! there.
//!
//! Four more states of an entry: while the switch waits for quiescence
//! ([`rewrite_flags::WATCH`]) the program learns the hop back to the sender
//! and its newest TSval and passes every packet to the proxy's socket;
//! while the switch reads the sockets ([`rewrite_flags::HOLD`]) it learns
//! the same, passes pure ACKs and RSTs and drops everything that carries a
//! sequence number forward; once the proxy has seen the flow end
//! ([`rewrite_flags::FINISHED`]) it still rewrites, but a SYN with the
//! flow's four-tuple makes it forget the entry; once the flow has ended
//! ([`rewrite_flags::ENDED`]) it drops every packet but such a SYN.
//!
//! A packet of a flow that cannot be rewritten whole is dropped, never
//! passed: the proxy's own socket would answer it, and its sender
//! retransmits a dropped packet anyway. The header length never changes
//! (options are rewritten in place), so a GRO packet keeps its segments.

use core::intrinsics::{AtomicOrdering::Relaxed, atomic_cxchg, atomic_xadd};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_NO_PREALLOC, BPF_F_PSEUDO_HDR, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::generated::{bpf_get_socket_cookie, bpf_redirect, bpf_skb_load_bytes},
    macros::{classifier, map},
    maps::{HashMap, PerCpuArray},
    programs::TcContext,
};
use proxy_common::{
    PacketFlowKey, PacketRewrite,
    packet::{PACKET_FLOWS_CAPACITY, PACKET_PROBES_CAPACITY, rewrite_flags},
};

use crate::packet::{ETH_HLEN, ETH_P_IP, IPPROTO_TCP, IPV4_HLEN};

/// One [`PacketRewrite`] per direction of a spliced connection, keyed by the
/// four-tuple its packets arrive with. Not preallocated: user space replaces
/// entries (hold → rewrite → ended) while the program may be writing to the
/// old one; a preallocated element is recycled at once, so such a write
/// could land in another flow's entry, while a replaced element of a map
/// without preallocation is freed only after the program is done with it.
#[map]
static PACKET_FLOWS: HashMap<PacketFlowKey, PacketRewrite> =
    HashMap::with_max_entries(PACKET_FLOWS_CAPACITY, BPF_F_NO_PREALLOC);

/// Packets the proxy's own spliced sockets sent that `packet_silence`
/// dropped (one slot; user space sums the CPUs).
#[map]
static PACKET_SILENCED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The cookies of the proxy's spliced sockets whose keepalive probe user
/// space is sending (one at a time): `packet_silence` lets their pure ACKs
/// out.
#[map]
static PACKET_PROBES: HashMap<u64, u8> = HashMap::with_max_entries(PACKET_PROBES_CAPACITY, 0);

/// 1: every packet's headers are copied out, as those past the linear part
/// are (`proxy_common::global::PACKET_HEADERS_COPIED`; only tests set it).
#[unsafe(no_mangle)]
static PACKET_HEADERS_COPIED: u8 = 0;

/// Offsets in the IPv4 header.
const IP_CHECKSUM: usize = 10;
const IP_SRC: usize = 12;
const IP_DST: usize = 16;
/// Offsets in the TCP header.
const TCP_SRC_PORT: usize = 0;
const TCP_DST_PORT: usize = 2;
const TCP_SEQ: usize = 4;
const TCP_ACK: usize = 8;
const TCP_DATA_OFFSET: usize = 12;
const TCP_FLAGS: usize = 13;
const TCP_WINDOW: usize = 14;
const TCP_CHECKSUM: usize = 16;
const TCP_HLEN: usize = 20;
/// TCP flag bits.
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;
/// TCP option kinds and lengths.
const OPT_END: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_SACK: u8 = 5;
const OPT_TIMESTAMP: u8 = 8;
const TIMESTAMP_LEN: u8 = 10;
/// Most option bytes a TCP header holds.
const MAX_OPTIONS: usize = 40;
/// The stack copy of the options: a power of two above [`MAX_OPTIONS`],
/// all of it initialised, so that an index masked to it is one the
/// verifier accepts (it cannot follow the walk's own bound).
const OPTION_BUFFER: usize = 64;
/// Most options (NOPs included) one header may hold here: Linux sends at
/// most six on a segment that is not a SYN (NOP, NOP, timestamps, NOP, NOP,
/// SACK). A walk over 40 one-byte steps is more than the verifier will
/// follow; a header with more options is dropped.
const MAX_OPTION_STEPS: usize = 12;
/// Most SACK blocks one option holds.
const MAX_SACK_BLOCKS: usize = 4;
/// Fragment bits of the IPv4 flags/offset field (MF and the offset).
const IPV4_FRAGMENT: u16 = 0x3fff;

/// A header of a spliced flow's packet could not be read, walked or
/// written: the packet is dropped rather than sent on.
struct Unusable;

#[classifier]
pub fn packet_splice(ctx: TcContext) -> i32 {
    match try_packet_splice(&ctx) {
        Ok(action) => action,
        Err(Unusable) => TC_ACT_SHOT,
    }
}

/// `packet_silence` (tc, clsact egress): a packet leaving the proxy with the
/// four-tuple of a spliced (not held) flow, sent by the proxy's own socket of
/// that connection (its cookie), is dropped: a stale ACK, window update or
/// probe from it would contradict the spliced flow; except the keepalive
/// probe user space sends on a quiet flow (the cookie in `PACKET_PROBES`, a
/// pure ACK), whose answer keeps the path's state (an NLB's) alive. The rewritten packets
/// with the same four-tuple come from another socket, or none, and pass.
#[classifier]
pub fn packet_silence(ctx: TcContext) -> i32 {
    let Some((ip, tcp, arriving)) = parse(&ctx) else { return TC_ACT_UNSPEC };
    // Leaving: the reverse of the key its connection's packets arrive with.
    let key = PacketFlowKey {
        remote_addr: arriving.local_addr,
        local_addr: arriving.remote_addr,
        remote_port: arriving.local_port,
        local_port: arriving.remote_port,
    };
    // SAFETY: read by value; user space writes whole entries.
    let Some(flow) = (unsafe { PACKET_FLOWS.get(key) }) else { return TC_ACT_UNSPEC };
    if flow.flags & rewrite_flags::HOLD != 0 || flow.socket_cookie == 0 {
        return TC_ACT_UNSPEC;
    }
    // SAFETY: the helper reads the packet's socket, if any (0 for none).
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if cookie != flow.socket_cookie {
        return TC_ACT_UNSPEC;
    }
    // SAFETY: read by value.
    if unsafe { PACKET_PROBES.get(cookie) }.is_some() && pure_ack(&ctx, ip, tcp) {
        return TC_ACT_UNSPEC;
    }
    if let Some(silenced) = PACKET_SILENCED.get_ptr_mut(0) {
        // SAFETY: this CPU's slot, valid while the program runs.
        unsafe { *silenced += 1 };
    }
    TC_ACT_SHOT
}

/// `Ok(TC_ACT_UNSPEC)` (next) for a packet of no spliced flow; the redirect's verdict
/// for one that was rewritten.
fn try_packet_splice(ctx: &TcContext) -> Result<i32, Unusable> {
    let Some((ip, tcp, key)) = parse(ctx) else { return Ok(TC_ACT_UNSPEC) };
    let Some(rewrite) = PACKET_FLOWS.get_ptr_mut(key) else { return Ok(TC_ACT_UNSPEC) };
    // SAFETY: a value of the map, valid while this program runs (the map is
    // not preallocated: an entry user space replaces meanwhile is freed only
    // after this run); read by value once.
    let r = unsafe { *rewrite };
    let flags: u8 = load(ctx, tcp + TCP_FLAGS)?;
    // A flow's handshake is over: a SYN with its four-tuple opens a new
    // connection (a client reusing the port of one that ended, or that it
    // reset while the switch still watches it). While the proxy's sockets
    // still carry the flow (watched or held), the SYN goes on to the stack,
    // which sends it to the listener (the old socket gone) or answers it;
    // it teaches nothing. Once the proxy has seen the flow end (its socket
    // on this side closed), the entry is forgotten, the other direction's
    // drops from now on, and the SYN goes on to the listener. In between,
    // rewritten it would reach the old upstream past the proxy; dropped, it
    // is sent again, and reaches the listener once the end is seen.
    if flags & SYN != 0 {
        if r.flags & (rewrite_flags::WATCH | rewrite_flags::HOLD) != 0 {
            return Ok(TC_ACT_UNSPEC);
        }
        if r.flags & (rewrite_flags::FINISHED | rewrite_flags::ENDED) != 0 {
            forget(&key, &r);
            return Ok(TC_ACT_UNSPEC);
        }
        return Ok(TC_ACT_SHOT);
    }
    if r.flags & rewrite_flags::ENDED != 0 {
        return Ok(TC_ACT_SHOT);
    }
    if r.flags & rewrite_flags::WATCH != 0 {
        learn(ctx, tcp, rewrite, &r)?;
        return Ok(TC_ACT_UNSPEC);
    }
    let payload = payload_len(ctx, ip, tcp)?;
    if r.flags & rewrite_flags::HOLD != 0 {
        learn(ctx, tcp, rewrite, &r)?;
        let moves_sequence = payload > 0 || flags & FIN != 0;
        return Ok(if moves_sequence { TC_ACT_SHOT } else { TC_ACT_UNSPEC });
    }
    let seq: [u8; 4] = load(ctx, tcp + TCP_SEQ)?;
    let ack: [u8; 4] = load(ctx, tcp + TCP_ACK)?;
    rewrite_addresses(ctx, ip, tcp, &key, &r)?;
    shift(ctx, tcp, tcp + TCP_SEQ, r.seq_delta)?;
    if flags & ACK != 0 {
        shift(ctx, tcp, tcp + TCP_ACK, r.ack_delta)?;
    }
    if r.sender_wscale != r.receiver_wscale {
        rescale_window(ctx, tcp, r.sender_wscale, r.receiver_wscale)?;
    }
    rewrite_options(ctx, tcp, &r)?;
    store(ctx, 0, &r.dst_mac)?;
    store(ctx, 6, &r.src_mac)?;
    let acked = (flags & ACK != 0).then(|| u32::from_be_bytes(ack).wrapping_add(r.ack_delta));
    let seq = u32::from_be_bytes(seq);
    count(rewrite, seq, payload, flags, acked);
    if flags & RST != 0 {
        // SAFETY: as in `count`.
        unsafe { atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*rewrite).resets, 1) };
        if plausible_reset(&r, seq) {
            // SAFETY: as in `count`; an idempotent mark.
            unsafe { (*rewrite).rst_seen = 1 };
        }
    }
    // SAFETY: the helper has no preconditions; an unknown ifindex makes the
    // redirect drop the packet.
    Ok(unsafe { bpf_redirect(r.ifindex, 0) } as i32)
}

/// Forgets the ended flow of `key` for a new connection on its four-tuple:
/// its entry goes, and the other direction's (whose packets arrive with the
/// reverse of the tuple `r` rewrites to) drops that flow's late packets, so
/// none is rewritten into the new connection.
fn forget(key: &PacketFlowKey, r: &PacketRewrite) {
    let other_key = PacketFlowKey {
        remote_addr: r.dst_addr,
        local_addr: r.src_addr,
        remote_port: r.dst_port,
        local_port: r.src_port,
    };
    if let Some(other) = PACKET_FLOWS.get_ptr_mut(other_key) {
        // SAFETY: a value of the map, valid while this program runs; a
        // plain store of the flags (user space replaces whole entries).
        unsafe { (*other).flags |= rewrite_flags::ENDED };
    }
    let _ = PACKET_FLOWS.remove(key);
}

/// The IPv4 and TCP header offsets and the four-tuple of an unfragmented
/// IPv4 TCP packet. Inlined into each program: as a function of its own,
/// called from both, it changes how the rest is compiled enough for the
/// verifier to refuse it.
///
/// Every packet on the interface comes through here, and nearly all of them
/// belong to no spliced flow; so the headers are read in place when they
/// are in the skb's linear part (a GRO packet's and a local socket's are),
/// a bounds check each, rather than by a helper call per field; otherwise
/// they are copied out.
#[inline(always)]
fn parse(ctx: &TcContext) -> Option<(usize, usize, PacketFlowKey)> {
    // SAFETY: a read of the global; user space set it at load (a constant
    // the verifier then prunes the other way by).
    if unsafe { core::ptr::read_volatile(&raw const PACKET_HEADERS_COPIED) } != 0 {
        return parse_copied(ctx);
    }
    match parse_in_place(ctx) {
        Linear::Parsed(parsed) => Some(parsed),
        Linear::NotOurs => None,
        Linear::Beyond => parse_copied(ctx),
    }
}

/// What [`parse_in_place`] found.
enum Linear {
    Parsed((usize, usize, PacketFlowKey)),
    /// Not an unfragmented IPv4 TCP packet.
    NotOurs,
    /// A header field lies past the linear part.
    Beyond,
}

#[inline(always)]
fn parse_in_place(ctx: &TcContext) -> Linear {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + ETH_HLEN + IPV4_HLEN > end {
        return Linear::Beyond;
    }
    // SAFETY: the Ethernet header and 20 bytes of IPv4 header were checked
    // against data_end just above.
    let (ether_type, version_ihl, fragment, protocol, addrs) = unsafe {
        (
            *((data + 12) as *const [u8; 2]),
            *((data + ETH_HLEN) as *const u8),
            *((data + ETH_HLEN + 6) as *const [u8; 2]),
            *((data + ETH_HLEN + 9) as *const u8),
            *((data + ETH_HLEN + IP_SRC) as *const [u8; 8]),
        )
    };
    if u16::from_be_bytes(ether_type) != ETH_P_IP
        || version_ihl >> 4 != 4
        || protocol != IPPROTO_TCP
        || u16::from_be_bytes(fragment) & IPV4_FRAGMENT != 0
    {
        return Linear::NotOurs;
    }
    let tcp = ETH_HLEN + usize::from(version_ihl & 0x0f) * 4;
    let ports_at = data + tcp;
    if ports_at + 4 > end {
        return Linear::Beyond;
    }
    // SAFETY: checked against data_end just above.
    let ports = unsafe { *(ports_at as *const [u8; 4]) };
    Linear::Parsed((ETH_HLEN, tcp, key_of(addrs, ports)))
}

/// [`parse`] by copying each field out (`bpf_skb_load_bytes`).
#[inline(always)]
fn parse_copied(ctx: &TcContext) -> Option<(usize, usize, PacketFlowKey)> {
    let ether_type: [u8; 2] = ctx.load(12).ok()?;
    if u16::from_be_bytes(ether_type) != ETH_P_IP {
        return None;
    }
    let ip = ETH_HLEN;
    let version_ihl: u8 = ctx.load(ip).ok()?;
    let protocol: u8 = ctx.load(ip + 9).ok()?;
    let fragment: [u8; 2] = ctx.load(ip + 6).ok()?;
    if version_ihl >> 4 != 4 || protocol != IPPROTO_TCP || u16::from_be_bytes(fragment) & IPV4_FRAGMENT != 0 {
        return None;
    }
    let tcp = ip + usize::from(version_ihl & 0x0f) * 4;
    let addrs: [u8; 8] = ctx.load(ip + IP_SRC).ok()?;
    let ports: [u8; 4] = ctx.load(tcp + TCP_SRC_PORT).ok()?;
    Some((ip, tcp, key_of(addrs, ports)))
}

/// The key of a packet with these source and destination addresses and
/// ports (as they lie in the headers).
#[inline(always)]
fn key_of(addrs: [u8; 8], ports: [u8; 4]) -> PacketFlowKey {
    PacketFlowKey {
        remote_addr: [addrs[0], addrs[1], addrs[2], addrs[3]],
        local_addr: [addrs[4], addrs[5], addrs[6], addrs[7]],
        remote_port: [ports[0], ports[1]],
        local_port: [ports[2], ports[3]],
    }
}

/// Whether the packet is a keepalive or window probe: only the ACK flag,
/// no payload.
#[inline(always)]
fn pure_ack(ctx: &TcContext, ip: usize, tcp: usize) -> bool {
    let flags: Result<u8, _> = load(ctx, tcp + TCP_FLAGS);
    matches!(flags, Ok(ACK)) && matches!(payload_len(ctx, ip, tcp), Ok(0))
}

/// TCP payload bytes: the IP total length less both headers. A total
/// length of 0 is IPv4 BIG TCP: a GRO or GSO packet longer than 64 KiB,
/// whose length only the skb knows (the kernel's `skb_ip_totlen` rule); the
/// frame then ends where the packet does (no link-layer padding on a packet
/// that size), so the skb's length less the link header is the IP length.
/// Counting such a packet as empty would lose its bytes from the flow's
/// counters and its end, and let a held flow's data through to the proxy.
fn payload_len(ctx: &TcContext, ip: usize, tcp: usize) -> Result<u64, Unusable> {
    let total: [u8; 2] = load(ctx, ip + 2)?;
    let data_offset: u8 = load(ctx, tcp + TCP_DATA_OFFSET)?;
    let headers = (tcp - ip) + usize::from(data_offset >> 4) * 4;
    let total = match u16::from_be_bytes(total) {
        0 => (ctx.len() as usize).saturating_sub(ip),
        total => usize::from(total),
    };
    Ok(total.saturating_sub(headers) as u64)
}

/// The other connection's addresses and ports, with both checksums.
fn rewrite_addresses(
    ctx: &TcContext,
    ip: usize,
    tcp: usize,
    key: &PacketFlowKey,
    r: &PacketRewrite,
) -> Result<(), Unusable> {
    let words = [(ip + IP_SRC, key.remote_addr, r.src_addr), (ip + IP_DST, key.local_addr, r.dst_addr)];
    for (offset, old, new) in words {
        let (old, new) = (u32::from_ne_bytes(old), u32::from_ne_bytes(new));
        ctx.l3_csum_replace(ip + IP_CHECKSUM, u64::from(old), u64::from(new), 4).map_err(|_| Unusable)?;
        l4_replace(ctx, tcp, u64::from(old), u64::from(new), BPF_F_PSEUDO_HDR as u64 | 4)?;
        store(ctx, offset, &new)?;
    }
    let ports =
        [(tcp + TCP_SRC_PORT, key.remote_port, r.src_port), (tcp + TCP_DST_PORT, key.local_port, r.dst_port)];
    for (offset, old, new) in ports {
        let (old, new) = (u16::from_ne_bytes(old), u16::from_ne_bytes(new));
        l4_replace(ctx, tcp, u64::from(old), u64::from(new), 2)?;
        store(ctx, offset, &new)?;
    }
    Ok(())
}

/// Adds `delta` to the big-endian 32-bit field at `offset` of the TCP header
/// at `tcp`, with its checksum.
fn shift(ctx: &TcContext, tcp: usize, offset: usize, delta: u32) -> Result<(), Unusable> {
    if delta == 0 {
        return Ok(());
    }
    let old: [u8; 4] = load(ctx, offset)?;
    let new = u32::from_be_bytes(old).wrapping_add(delta).to_be_bytes();
    replace_bytes(ctx, tcp, offset, old, new)
}

/// Writes `new` over `old` at `offset` of the TCP header at `tcp`, with its
/// checksum. The checksum helper sums 16-bit words as if the field started
/// on one; an option field may start at an odd offset (a layout Linux does
/// not send, others may), where each of its bytes sits in the other half of
/// its word: the values are then given to the helper with each byte pair
/// swapped, whose sum is the one the field adds where it is. Chosen without
/// a branch: one more branch here doubles the states the verifier walks
/// through the option loop, past its limit.
#[inline(always)]
fn replace_bytes<const N: usize>(
    ctx: &TcContext,
    tcp: usize,
    offset: usize,
    old: [u8; N],
    new: [u8; N],
) -> Result<(), Unusable> {
    let odd = core::hint::black_box(((offset - tcp) & 1) as u32);
    let keep = odd.wrapping_sub(1); // all ones when even, zero when odd
    let as_summed = |bytes: [u8; N]| {
        let word = match N {
            2 => u32::from(u16::from_ne_bytes([bytes[0], bytes[1]])),
            _ => u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        };
        let swapped = ((word & 0x00ff_00ff) << 8) | ((word >> 8) & 0x00ff_00ff);
        u64::from((word & keep) | (swapped & !keep))
    };
    l4_replace(ctx, tcp, as_summed(old), as_summed(new), N as u64)?;
    store(ctx, offset, &new)
}

/// The window in the receiver's scale: `window << sender >> receiver`,
/// at most 65,535.
fn rescale_window(ctx: &TcContext, tcp: usize, sender: u8, receiver: u8) -> Result<(), Unusable> {
    let old: [u8; 2] = load(ctx, tcp + TCP_WINDOW)?;
    let bytes = u64::from(u16::from_be_bytes(old)) << (sender & 15);
    let scaled = (bytes >> (receiver & 15)).min(u64::from(u16::MAX)) as u16;
    let new = scaled.to_be_bytes();
    l4_replace(ctx, tcp, u64::from(u16::from_ne_bytes(old)), u64::from(u16::from_ne_bytes(new)), 2)?;
    store(ctx, tcp + TCP_WINDOW, &new)
}

/// A watched or held flow's packet: the hop back to its sender (the interface it came
/// in by, its Ethernet addresses swapped) and the sender's newest TSval.
#[inline(always)]
fn learn(
    ctx: &TcContext,
    tcp: usize,
    rewrite: *mut PacketRewrite,
    r: &PacketRewrite,
) -> Result<(), Unusable> {
    let macs: [u8; 12] = load(ctx, 0)?;
    let mut options = [0u8; OPTION_BUFFER];
    let tsval = read_options(ctx, tcp, &mut options)?.timestamp.map(|at| {
        u32::from_be_bytes([
            options[(at + 2) & (OPTION_BUFFER - 1)],
            options[(at + 3) & (OPTION_BUFFER - 1)],
            options[(at + 4) & (OPTION_BUFFER - 1)],
            options[(at + 5) & (OPTION_BUFFER - 1)],
        ])
    });
    // SAFETY: the context's socket buffer, valid while this program runs.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: as in `try_packet_splice`; while the flow is watched or held
    // user space only reads the entry (or replaces it whole). Two CPUs learning at once write values of the
    // same hop; the TSval may then be the older of two close ones, which the
    // mapping tolerates (it anchors at any TSval the peer sent).
    let entry = unsafe { &mut *rewrite };
    entry.ifindex = ifindex;
    entry.src_mac = [macs[0], macs[1], macs[2], macs[3], macs[4], macs[5]];
    entry.dst_mac = [macs[6], macs[7], macs[8], macs[9], macs[10], macs[11]];
    if let Some(tsval) = tsval {
        // The newest: a reordered older segment does not move it back.
        if r.ifindex == 0 || tsval.wrapping_sub(r.peer_tsval) as i32 > 0 {
            entry.peer_tsval = tsval;
        }
    }
    Ok(())
}

/// The options of the TCP header at `tcp`, copied into `options`, and where
/// the ones that matter here are ([`Found::NONE`] for a header without).
/// Read once and walked there: a walk with a helper call per byte is more
/// than the verifier will follow.
#[inline(always)]
fn read_options(ctx: &TcContext, tcp: usize, options: &mut [u8; OPTION_BUFFER]) -> Result<Found, Unusable> {
    let data_offset: u8 = load(ctx, tcp + TCP_DATA_OFFSET)?;
    let words = u32::from(data_offset >> 4);
    if words <= 5 {
        return Ok(Found::NONE);
    }
    // 4 to 40. Checked again after an opaque copy: the compiler would fold
    // the check above into the arithmetic, and the verifier, which sees only
    // the register passed to the helper, must find the bound on it.
    let len = core::hint::black_box((words - 5) * 4);
    if len == 0 || len > MAX_OPTIONS as u32 {
        return Err(Unusable);
    }
    // SAFETY: `options` has room for `len` (at most 40) bytes; the helper
    // fails rather than read past the packet.
    let read = unsafe {
        bpf_skb_load_bytes(ctx.as_ptr(), (tcp + TCP_HLEN) as u32, options.as_mut_ptr().cast(), len)
    };
    if read != 0 {
        return Err(Unusable);
    }
    find_options(options, len as usize)
}

/// Timestamps shifted, SACK edges shifted (or the option blanked), in place.
#[inline(always)]
fn rewrite_options(ctx: &TcContext, tcp: usize, r: &PacketRewrite) -> Result<(), Unusable> {
    let mut options = [0u8; OPTION_BUFFER];
    let found = read_options(ctx, tcp, &mut options)?;
    if let Some(at) = found.timestamp
        && r.flags & rewrite_flags::TIMESTAMPS != 0
    {
        shift(ctx, tcp, tcp + TCP_HLEN + at + 2, r.tsval_delta)?;
        shift(ctx, tcp, tcp + TCP_HLEN + at + 6, r.tsecr_delta)?;
    }
    if let Some((at, sack_len)) = found.sack {
        rewrite_sack(ctx, tcp, TCP_HLEN + at, sack_len, r)?;
    }
    Ok(())
}

/// Where the options that carry sequence numbers or timestamps start
/// (offsets in the option area).
struct Found {
    timestamp: Option<usize>,
    /// Offset and length of the SACK option.
    sack: Option<(usize, u8)>,
}

impl Found {
    const NONE: Self = Self { timestamp: None, sack: None };
}

/// Walks the first `len` bytes of `options`; an option that runs past
/// them, or more than [`MAX_OPTION_STEPS`] options, is an error.
fn find_options(options: &[u8; OPTION_BUFFER], len: usize) -> Result<Found, Unusable> {
    let mut found = Found::NONE;
    let mut at = 0;
    for _ in 0..MAX_OPTION_STEPS {
        if at >= len {
            break;
        }
        let kind = options[at & (OPTION_BUFFER - 1)];
        if kind == OPT_END {
            break;
        }
        if kind == OPT_NOP {
            at += 1;
            continue;
        }
        let option_len = options[(at + 1) & (OPTION_BUFFER - 1)];
        if option_len < 2 || at + usize::from(option_len) > len {
            return Err(Unusable);
        }
        if kind == OPT_TIMESTAMP && option_len == TIMESTAMP_LEN {
            found.timestamp = Some(at);
        } else if kind == OPT_SACK {
            found.sack = Some((at, option_len));
        }
        at += usize::from(option_len);
    }
    if at < len && options[at & (OPTION_BUFFER - 1)] != OPT_END {
        return Err(Unusable);
    }
    Ok(found)
}

/// A SACK option's edges shifted like the acknowledgement number, or the
/// whole option overwritten with NOPs when one side did not negotiate SACK.
fn rewrite_sack(ctx: &TcContext, tcp: usize, at: usize, len: u8, r: &PacketRewrite) -> Result<(), Unusable> {
    let edges = usize::from(len.saturating_sub(2)) / 4;
    for edge in 0..2 * MAX_SACK_BLOCKS {
        if edge >= edges {
            break;
        }
        let offset = tcp + at + 2 + edge * 4;
        if r.flags & rewrite_flags::STRIP_SACK != 0 {
            let old: [u8; 4] = load(ctx, offset)?;
            replace_bytes(ctx, tcp, offset, old, [OPT_NOP; 4])?;
        } else {
            shift(ctx, tcp, offset, r.ack_delta)?;
        }
    }
    if r.flags & rewrite_flags::STRIP_SACK != 0 {
        // Kind and length too: the option becomes NOPs.
        let old: [u8; 2] = load(ctx, tcp + at)?;
        replace_bytes(ctx, tcp, tcp + at, old, [OPT_NOP; 2])?;
    }
    Ok(())
}

/// Most tries to move a sequence number forward against other CPUs doing
/// the same.
const MAX_SEQ_TRIES: usize = 8;

/// Packets, new payload bytes (a retransmission moves `next_seq` no
/// further), the furthest acknowledgement, and the FIN seen.
/// Atomic: one flow's packets may be processed on several CPUs at once (a
/// veth delivers on the sender's CPU, RPS may spread a queue), and plain
/// read-modify-writes then count a byte twice. The bytes are what this
/// packet moved `next_seq` by.
#[inline(always)]
fn count(rewrite: *mut PacketRewrite, seq: u32, payload: u64, flags: u8, acked: Option<u32>) {
    // SAFETY: the map value is valid and aligned (8) while this program
    // runs; the counters are only ever changed atomically by the program
    // (user space writes them only before the flow carries packets).
    let (packets, bytes) = unsafe { (&raw mut (*rewrite).packets, &raw mut (*rewrite).bytes) };
    // SAFETY: as above.
    unsafe { atomic_xadd::<u64, u64, { Relaxed }>(packets, 1) };
    // A packet without payload moves nothing: after a FIN, its sender's
    // ACKs carry the sequence number after the FIN's.
    // SAFETY: as above.
    let next_seq = unsafe { &raw mut (*rewrite).next_seq };
    // SAFETY: as above (a whole aligned load).
    let expected = unsafe { next_seq.read_volatile() } as u32;
    let repeat = if payload > 0 {
        let moved = advance(next_seq, seq.wrapping_add(payload as u32));
        if moved > 0 {
            // SAFETY: as above.
            unsafe { atomic_xadd::<u64, u64, { Relaxed }>(bytes, u64::from(moved)) };
        }
        moved == 0
    } else {
        // A probe: one sequence number before the next byte.
        flags & (FIN | RST) == 0 && seq == expected.wrapping_sub(1)
    };
    if repeat {
        // SAFETY: as above.
        unsafe { atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*rewrite).repeats, 1) };
    }
    if let Some(acked) = acked {
        // SAFETY: as above.
        advance(unsafe { &raw mut (*rewrite).acked }, acked);
    }
    // Idempotent marks: an aligned 32-bit store needs no atomic (a FIN's
    // retransmission carries the same sequence number).
    if flags & FIN != 0 {
        // SAFETY: as above.
        unsafe {
            (*rewrite).fin_seq = seq.wrapping_add(payload as u32);
            (*rewrite).fin_seen = 1;
        }
    }
}

/// Whether a RST numbered `seq` could come from its sender's stack: no
/// further back than its receiver has acknowledged (the other direction's
/// furthest ACK, in this sender's numbering) and no further on than the
/// sender's next byte (`r`, before this packet), or the number after its
/// FIN once it sent one (a socket that closes after its FIN resets at that
/// number; a FIN moves `next_seq` by nothing). Only such a RST ends the
/// flow; one with the four-tuple and another number (a blind RST) is still
/// sent on, and its receiver's own checks (RFC 5961) decide: it answers one
/// inside its window with a challenge ACK, whose reply from the sender's
/// stack is then exactly numbered.
#[inline(always)]
fn plausible_reset(r: &PacketRewrite, seq: u32) -> bool {
    let next = if r.fin_seen != 0 { r.fin_seq.wrapping_add(1) } else { r.next_seq as u32 };
    let other = PacketFlowKey {
        remote_addr: r.dst_addr,
        local_addr: r.src_addr,
        remote_port: r.dst_port,
        local_port: r.src_port,
    };
    // SAFETY: read by value; user space writes whole entries.
    let lowest = match unsafe { PACKET_FLOWS.get(other) } {
        Some(other) => other.acked as u32,
        None => next,
    };
    seq.wrapping_sub(lowest) <= next.wrapping_sub(lowest)
}

/// Moves the sequence number in the low half of `*field` forward to `to`
/// (modulo 2³², never back), by compare-and-swap; how far it moved.
#[inline(always)]
fn advance(field: *mut u64, to: u32) -> u32 {
    // SAFETY: the caller's field, valid and aligned, only changed atomically.
    // A plain (volatile) load: an aligned 64-bit load is whole, and the
    // compare-and-swap below checks it.
    let mut seen = unsafe { field.read_volatile() };
    for _ in 0..MAX_SEQ_TRIES {
        let ahead = to.wrapping_sub(seen as u32) as i32;
        if ahead <= 0 {
            return 0;
        }
        // SAFETY: as above.
        let (now, swapped) =
            unsafe { atomic_cxchg::<u64, { Relaxed }, { Relaxed }>(field, seen, u64::from(to)) };
        if swapped {
            return ahead as u32;
        }
        seen = now;
    }
    0
}

fn load<T>(ctx: &TcContext, offset: usize) -> Result<T, Unusable> {
    ctx.load(offset).map_err(|_| Unusable)
}

fn store<T>(ctx: &TcContext, offset: usize, value: &T) -> Result<(), Unusable> {
    ctx.store(offset, value, 0).map_err(|_| Unusable)
}

/// `bpf_l4_csum_replace` on the TCP checksum.
fn l4_replace(ctx: &TcContext, tcp: usize, old: u64, new: u64, flags: u64) -> Result<(), Unusable> {
    ctx.l4_csum_replace(tcp + TCP_CHECKSUM, old, new, flags).map_err(|_| Unusable)
}
