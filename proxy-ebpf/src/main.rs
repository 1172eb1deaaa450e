//! Kernel programs of splice-proxy.
//!
//! `splice_verdict` (`sk_skb/stream_verdict`) runs for every skb a spliced
//! socket receives and redirects it to the egress of the peer socket, so the
//! bytes of an established connection never reach user space. The kernel gives
//! this path no backpressure, so the program keeps its own: it counts what it
//! redirected per direction, compares that with what the peer socket has sent,
//! and once more than `max_inflight` bytes wait it pauses the direction: from
//! then on it returns SK_PASS (the bytes stay on the source socket, charged to
//! its receive buffer, so TCP slows the sender) and tells user space, which
//! copies them with plain reads and writes. Once user space has written every
//! passed byte to the peer (it says so in `SPLICE_USER_BYTES`) and the peer
//! has taken most of what waited, the next skb is redirected again: every
//! byte before it is already in the peer's send queue, so order holds.
#![no_std]
#![no_main]
// The BPF target's `core` has no atomic read-modify-write types; the
// intrinsics lower to the BPF atomic instructions (`packet_splice::count`).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod lossy;
mod packet;
mod packet_splice;
mod source_filter;

use core::ffi::c_void;

use aya_ebpf::{
    bindings::sk_action,
    helpers::{
        bpf_probe_read_kernel,
        generated::{bpf_get_socket_cookie, bpf_map_lookup_elem, bpf_sk_release, bpf_skc_to_tcp_sock},
    },
    macros::{map, stream_verdict},
    maps::{HashMap, PerCpuArray, RingBuf, SockHash},
    programs::SkBuffContext,
};
use aya_log_ebpf::{debug, trace, warn};
use proxy_common::{Flow, FlowEvent, SPLICE_EVENTS_BYTES, SPLICE_SOCKETS_CAPACITY, VerdictStats, pause};

/// Sockets being spliced, keyed by socket cookie; the verdict program is attached here.
#[map]
static SPLICE_SOCKETS: SockHash<u64> = SockHash::with_max_entries(SPLICE_SOCKETS_CAPACITY, 0);

/// One [`Flow`] per direction, keyed by the cookie of the socket the bytes come from.
#[map]
static SPLICE_FLOWS: HashMap<u64, Flow> = HashMap::with_max_entries(SPLICE_SOCKETS_CAPACITY, 0);

/// Bytes of each paused direction that user space wrote to the peer, by
/// source cookie; only user space writes it.
#[map]
static SPLICE_USER_BYTES: HashMap<u64, u64> = HashMap::with_max_entries(SPLICE_SOCKETS_CAPACITY, 0);

/// Pause notifications ([`FlowEvent`]) for user space.
#[map]
static SPLICE_EVENTS: RingBuf = RingBuf::with_byte_size(SPLICE_EVENTS_BYTES, 0);

/// Byte offset of `write_seq` in `struct tcp_sock`: user space always sets it
/// at load from the running kernel's BTF (named by
/// `proxy_common::global::TCP_SOCK_WRITE_SEQ_OFFSET`).
#[unsafe(no_mangle)]
static TCP_SOCK_WRITE_SEQ_OFFSET: u32 = 0;

/// Byte offset of `copied_seq` in `struct tcp_sock`, set like the one above
/// (`proxy_common::global::TCP_SOCK_COPIED_SEQ_OFFSET`).
#[unsafe(no_mangle)]
static TCP_SOCK_COPIED_SEQ_OFFSET: u32 = 0;

/// Byte offsets of `sk_wmem_queued` and `sk_sndbuf` in `struct sock` (which
/// `struct tcp_sock` starts with): user space always sets them at load from
/// BTF (named by `proxy_common::global::SOCK_WMEM_QUEUED_OFFSET` and
/// `SOCK_SNDBUF_OFFSET`).
#[unsafe(no_mangle)]
static SOCK_WMEM_QUEUED_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static SOCK_SNDBUF_OFFSET: u32 = 0;

/// Offset of the TCP sequence number in `struct sk_buff` (its `cb` holds a
/// `struct tcp_skb_cb`): user space always sets it at load from BTF.
#[unsafe(no_mangle)]
static SKB_TCP_SEQ_OFFSET: u32 = 0;

/// One [`VerdictStats`] slot per CPU; user space sums the CPUs.
#[map]
static VERDICT_STATS: PerCpuArray<VerdictStats> = PerCpuArray::with_max_entries(1, 0);

/// Why a verdict could not be counted.
enum VerdictError {
    /// The per-CPU stats slot was missing (cannot happen for index 0 of a
    /// one-entry array, but the verifier needs the check).
    NoStatsSlot,
}

#[stream_verdict]
pub fn splice_verdict(ctx: SkBuffContext) -> u32 {
    match try_splice_verdict(&ctx) {
        Ok(verdict) => verdict,
        // Never drop bytes because of our own bookkeeping.
        Err(VerdictError::NoStatsSlot) => sk_action::SK_PASS,
    }
}

fn try_splice_verdict(ctx: &SkBuffContext) -> Result<u32, VerdictError> {
    let len = ctx.len();
    let stats = VERDICT_STATS.get_ptr_mut(0).ok_or(VerdictError::NoStatsSlot)?;
    // SAFETY: the pointer comes from a successful lookup of this CPU's slot of
    // a per-CPU map; nothing else writes it while this program runs on this CPU.
    let stats = unsafe { &mut *stats };
    stats.skbs += 1;
    stats.bytes += u64::from(len);
    trace!(ctx, "skb of {} bytes", len);
    if len == 0 {
        // A zero-length skb carries a FIN. Redirecting it puts EPIPE on the
        // peer, passing it can wedge the psock backlog; the socket sees the FIN
        // anyway, and user space carries it across (docs/kernel-notes.md,
        // "Zero-length skbs").
        stats.empty_skbs += 1;
        debug!(ctx, "zero-length skb dropped");
        return Ok(sk_action::SK_DROP);
    }
    // SAFETY: the helper only reads the socket of the skb in the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast::<c_void>()) };
    let Some(flow) = SPLICE_FLOWS.get_ptr_mut(cookie) else {
        stats.passed_bytes += u64::from(len);
        return Ok(sk_action::SK_PASS);
    };
    // SAFETY: a pointer from a successful hash lookup; this socket's skbs are
    // handled one at a time (under its socket lock), so nothing else writes it.
    let flow = unsafe { &mut *flow };
    // A retransmitted skb can start before bytes this socket already received
    // (seq < rcv_nxt < end_seq). The verdict-only read path hands it over
    // whole, so cut the old head off; drop it if nothing in it is new.
    // A skb whose start cannot be placed, or whose old head cannot be cut,
    // pauses the flow with NO_SEQ, and user space resets the connection: a
    // reset is seen, bytes forwarded twice are not (docs/kernel-notes.md,
    // "Sockmap duplicate under load").
    let Some(mut seq) = skb_seq(ctx) else {
        return Ok(pause_flow(ctx, flow, stats, cookie, pause::NO_SEQ, len));
    };
    let mut len = len;
    if flow.seq_set == 0 {
        // The first skb may hold bytes user space read before the socket
        // entered the map (a PROXY header): the verdict path hands the skb
        // over whole, so start from the first byte nobody read.
        if let Some(own) = socket_state(cookie) {
            flow.next_seq = own.copied_seq;
            flow.seq_set = 1;
        }
    }
    if flow.seq_set != 0 {
        let behind = flow.next_seq.wrapping_sub(seq);
        if behind != 0 && behind < 1 << 31 {
            if behind >= len {
                stats.old_skbs += 1;
                return Ok(sk_action::SK_DROP);
            }
            if let Err((cut, error)) = trim_head(ctx, behind) {
                // Passing the rest would hand user space bytes it already
                // forwarded: NO_SEQ tells it to reset the connection instead.
                stats.trim_failures += 1;
                warn!(
                    ctx,
                    "old head of a retransmitted skb not cut ({} of {} bytes): error {}", cut, behind, error
                );
                return Ok(pause_flow(ctx, flow, stats, cookie, pause::NO_SEQ, len - cut));
            }
            stats.trimmed_bytes += u64::from(behind);
            seq = seq.wrapping_add(behind);
            len -= behind;
        }
    }
    flow.next_seq = seq.wrapping_add(len);
    flow.seq_set = 1;
    // SAFETY: a plain read of a value user space keeps up to date.
    let user_bytes = unsafe { SPLICE_USER_BYTES.get(cookie) }.copied().unwrap_or(0);
    let peer = peer_backlog(flow, user_bytes);
    if flow.paused != 0 {
        // Resume only when no passed byte is left for user space to write
        // (then every earlier byte is in the peer's send queue) and the peer
        // has room for twice what pausing allows.
        let resumable = flow.pause_reason == pause::INFLIGHT
            && user_bytes == flow.passed_bytes
            && peer.is_some_and(|p| p.fits(len, flow.max_inflight / 2, 1));
        if !resumable {
            flow.passed_bytes += u64::from(len);
            stats.passed_bytes += u64::from(len);
            return Ok(sk_action::SK_PASS);
        }
        flow.paused = 0;
        flow.pause_reason = pause::NONE;
        flow.resumes += 1;
    }
    let reason = match peer {
        None => pause::NO_PEER,
        Some(p) if !p.fits(len, flow.max_inflight, 2) => pause::INFLIGHT,
        Some(_) => pause::NONE,
    };
    if reason == pause::NONE
        && SPLICE_SOCKETS.redirect_skb(ctx, flow.peer_cookie, 0) == i64::from(sk_action::SK_PASS)
    {
        flow.redirected_bytes += u64::from(len);
        stats.redirected_bytes += u64::from(len);
        return Ok(sk_action::SK_PASS);
    }
    let reason = if reason == pause::NONE { pause::NO_PEER } else { reason };
    Ok(pause_flow(ctx, flow, stats, cookie, reason, len))
}

/// How much the peer socket holds of what this direction gave it.
#[derive(Clone, Copy)]
struct PeerBacklog {
    /// Bytes given to the peer (redirected, or written by user space) that
    /// are not yet in its send queue: they sit, uncharged, on its psock queue.
    queued: u64,
    /// The peer's send queue (`sk_wmem_queued`) and its limit (`sk_sndbuf`).
    wmem_queued: u64,
    sndbuf: u64,
}

impl PeerBacklog {
    /// Whether `len` more bytes may be redirected: at most `max_queued` may
    /// wait on the psock queue, and all of them must fit in the send queue
    /// without waiting for an acknowledgement: the psock worker sends only
    /// while the socket is writeable (free space at least half of what is
    /// queued), and skb overhead can double the charge. A redirected skb that
    /// cannot move into the send queue blocks the psock queue, and the bytes
    /// this socket passes to user space queue up behind it; if its receive
    /// window closes meanwhile, the peer's acknowledgements are refused as
    /// beyond the window, nothing moves, and the connection hangs
    /// (docs/kernel-notes.md, *Facts re-checked*). At most `thirds` thirds
    /// of the send buffer may be used: two to keep splicing, one to resume.
    fn fits(self, len: u32, max_queued: u64, thirds: u64) -> bool {
        let queued = self.queued + u64::from(len);
        queued <= max_queued && self.wmem_queued + 2 * queued <= self.sndbuf * thirds / 3
    }
}

/// What the peer holds for this direction; `None` when it is not in the socket map.
fn peer_backlog(flow: &mut Flow, user_bytes: u64) -> Option<PeerBacklog> {
    let peer = socket_state(flow.peer_cookie)?;
    if flow.base_set == 0 {
        flow.peer_write_seq_base = peer.write_seq;
        flow.base_set = 1;
    }
    // Sequence arithmetic wraps at 4 GiB; the difference stays far below
    // that. User space publishes its count after its write returns, so the
    // difference can be briefly negative: nothing waits then.
    let taken = peer.write_seq.wrapping_sub(flow.peer_write_seq_base);
    let given = flow.redirected_bytes.wrapping_add(user_bytes) as u32;
    let waiting = given.wrapping_sub(taken) as i32;
    Some(PeerBacklog {
        queued: if waiting > 0 { waiting as u64 } else { 0 },
        wmem_queued: u64::from(peer.wmem_queued),
        sndbuf: u64::from(peer.sndbuf),
    })
}

/// Pauses the flow: this skb and all later ones stay on this socket, in
/// order, and user space is told.
fn pause_flow(
    ctx: &SkBuffContext,
    flow: &mut Flow,
    stats: &mut VerdictStats,
    cookie: u64,
    reason: u32,
    len: u32,
) -> u32 {
    flow.paused = 1;
    flow.pause_reason = reason;
    flow.pauses += 1;
    flow.passed_bytes += u64::from(len);
    stats.passed_bytes += u64::from(len);
    let event = FlowEvent { cookie, reason, _pad: 0 };
    // Pauses are rare: always wake the reader rather than rely on the
    // ring buffer's adaptive wake-ups.
    if SPLICE_EVENTS.output::<FlowEvent>(&event, BPF_RB_FORCE_WAKEUP).is_err() {
        stats.lost_events += 1;
        debug!(ctx, "event ring full");
    }
    sk_action::SK_PASS
}

/// The TCP sequence number of the skb's first byte (`TCP_SKB_CB(skb)->seq`).
fn skb_seq(ctx: &SkBuffContext) -> Option<u32> {
    // SAFETY: a read of the global; user space set it at load.
    let offset = unsafe { core::ptr::read_volatile(&raw const SKB_TCP_SEQ_OFFSET) } as usize;
    // The context of an sk_skb program is the kernel's `struct sk_buff`.
    let src = ctx.skb.skb.cast::<u8>().wrapping_add(offset).cast::<u32>();
    // SAFETY: probe_read copes with any address; the offset comes from BTF.
    unsafe { bpf_probe_read_kernel(src) }.ok()
}

/// Cuts `bytes` from the head of the skb; on failure, how many it cut and
/// the error. `bpf_skb_adjust_room` takes at most 4095 bytes per call in
/// sk_skb programs, hence the (bounded) loop, and pulls what it cuts into
/// the linear area, which keeps what earlier calls cut as headroom: called
/// alone, each call would reallocate and copy an ever larger head. So the
/// whole head is pulled in once first, and the calls then only move the
/// start. Either way the head needs one contiguous atomic allocation about
/// as large as what is cut; when that fails the calls fail too, and the
/// caller pauses the flow with NO_SEQ.
fn trim_head(ctx: &SkBuffContext, bytes: u32) -> Result<(), (u32, i64)> {
    let _ = ctx.pull_data(bytes);
    let mut left = bytes;
    for _ in 0..MAX_TRIM_STEPS {
        if left == 0 {
            return Ok(());
        }
        let step = if left > MAX_TRIM_STEP { MAX_TRIM_STEP } else { left };
        ctx.adjust_room(-(step as i32), 0, 0).map_err(|e| (bytes - left, e))?;
        left -= step;
    }
    if left == 0 { Ok(()) } else { Err((bytes - left, -1)) }
}

/// `bpf_ringbuf_output` flag: notify the consumer now.
const BPF_RB_FORCE_WAKEUP: u64 = 2;

/// Largest head trim `bpf_skb_adjust_room` does at once for sk_skb.
const MAX_TRIM_STEP: u32 = 4095;
/// Steps for a head of up to 512 × 4095 bytes (just under 2 MiB). A
/// retransmitted skb is not bounded by the 64 KiB of one GSO segment: the
/// receive queues coalesce skbs, up to `MAX_SKB_FRAGS` page fragments each
/// (with 4 KiB pages, fragments of up to 32 KiB: 1.4 MiB at the largest
/// build setting). A longer head is not cut (NO_SEQ).
const MAX_TRIM_STEPS: u32 = 512;

/// Fields of a socket in the map that the program reads.
struct SocketState {
    /// `tcp_sock.write_seq`: everything ever queued for sending on it.
    write_seq: u32,
    /// `tcp_sock.copied_seq`: the next byte to hand to a reader.
    copied_seq: u32,
    /// `sock.sk_wmem_queued` and `sock.sk_sndbuf`.
    wmem_queued: u32,
    sndbuf: u32,
}

/// Reads the fields of the socket with `cookie`, or `None` when it is not in the socket map.
fn socket_state(cookie: u64) -> Option<SocketState> {
    let map = (&raw const SPLICE_SOCKETS).cast_mut().cast::<c_void>();
    let key = (&raw const cookie).cast::<c_void>();
    // SAFETY: a lookup in a SOCKHASH returns a referenced socket or null; it
    // is released below on every path.
    let sk = unsafe { bpf_map_lookup_elem(map, key) };
    if sk.is_null() {
        return None;
    }
    // SAFETY: `sk` is a valid socket pointer for as long as we hold it.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk) }.cast::<u8>();
    let state = if tp.is_null() {
        None
    } else {
        // SAFETY (all four): reads of globals user space set at load from
        // the running kernel's BTF, and loads inside `tp` (a `tcp_sock`,
        // which starts with its `sock`) while we still hold it.
        let field = |offset: &u32| unsafe {
            let offset = core::ptr::read_volatile(offset) as usize;
            *tp.add(offset).cast::<u32>()
        };
        Some(SocketState {
            write_seq: field(&TCP_SOCK_WRITE_SEQ_OFFSET),
            copied_seq: field(&TCP_SOCK_COPIED_SEQ_OFFSET),
            wmem_queued: field(&SOCK_WMEM_QUEUED_OFFSET),
            sndbuf: field(&SOCK_SNDBUF_OFFSET),
        })
    };
    // SAFETY: releases the reference taken by the lookup.
    unsafe { bpf_sk_release(sk.cast::<c_void>()) };
    state
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The object's licence as the kernel reads it: the same terms as this
/// crate's `MIT OR GPL-2.0`, in one of the strings the kernel accepts as
/// GPL-compatible (which GPL-only helpers require).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
