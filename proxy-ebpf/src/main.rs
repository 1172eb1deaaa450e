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
//! finishes that direction with plain reads and writes.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    bindings::sk_action,
    helpers::generated::{bpf_get_socket_cookie, bpf_map_lookup_elem, bpf_sk_release, bpf_skc_to_tcp_sock},
    macros::{map, stream_verdict},
    maps::{HashMap, PerCpuArray, RingBuf, SockHash},
    programs::SkBuffContext,
};
use aya_log_ebpf::{debug, trace};
use proxy_common::{Flow, FlowEvent, SPLICE_EVENTS_BYTES, SPLICE_SOCKETS_CAPACITY, VerdictStats, pause};

/// Sockets being spliced, keyed by socket cookie; the verdict program is attached here.
#[map]
static SPLICE_SOCKETS: SockHash<u64> = SockHash::with_max_entries(SPLICE_SOCKETS_CAPACITY, 0);

/// One [`Flow`] per direction, keyed by the cookie of the socket the bytes come from.
#[map]
static SPLICE_FLOWS: HashMap<u64, Flow> = HashMap::with_max_entries(SPLICE_SOCKETS_CAPACITY, 0);

/// Pause notifications ([`FlowEvent`]) for user space.
#[map]
static SPLICE_EVENTS: RingBuf = RingBuf::with_byte_size(SPLICE_EVENTS_BYTES, 0);

/// Byte offset of `write_seq` in `struct tcp_sock`: user space always sets it
/// at load from the running kernel's BTF (named by
/// `proxy_common::global::TCP_SOCK_WRITE_SEQ_OFFSET`).
#[unsafe(no_mangle)]
static TCP_SOCK_WRITE_SEQ_OFFSET: u32 = 0;

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
        // anyway, and user space carries it across (DESIGN.md).
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
    if flow.paused != 0 {
        flow.passed_bytes += u64::from(len);
        stats.passed_bytes += u64::from(len);
        return Ok(sk_action::SK_PASS);
    }
    let reason = match peer_write_seq(flow.peer_cookie) {
        None => pause::NO_PEER,
        Some(write_seq) => {
            if flow.base_set == 0 {
                flow.peer_write_seq_base = write_seq;
                flow.base_set = 1;
            }
            // Bytes redirected but not yet in the peer's send queue. Sequence
            // arithmetic wraps at 4 GiB; the difference stays far below that.
            let taken = write_seq.wrapping_sub(flow.peer_write_seq_base);
            let waiting = (flow.redirected_bytes as u32).wrapping_sub(taken);
            if u64::from(waiting) + u64::from(len) > flow.max_inflight { pause::INFLIGHT } else { pause::NONE }
        }
    };
    if reason == pause::NONE
        && SPLICE_SOCKETS.redirect_skb(ctx, flow.peer_cookie, 0) == i64::from(sk_action::SK_PASS)
    {
        flow.redirected_bytes += u64::from(len);
        stats.redirected_bytes += u64::from(len);
        return Ok(sk_action::SK_PASS);
    }
    // Pause: this skb and all later ones stay on this socket, in order.
    let reason = if reason == pause::NONE { pause::NO_PEER } else { reason };
    flow.paused = 1;
    flow.pause_reason = reason;
    flow.passed_bytes += u64::from(len);
    stats.passed_bytes += u64::from(len);
    let event = FlowEvent { cookie, reason, _pad: 0 };
    if SPLICE_EVENTS.output::<FlowEvent>(&event, 0).is_err() {
        debug!(ctx, "event ring full");
    }
    Ok(sk_action::SK_PASS)
}

/// The peer socket's `write_seq` (everything ever queued for sending on it),
/// or `None` when it is not in the socket map.
fn peer_write_seq(peer_cookie: u64) -> Option<u32> {
    let map = (&raw const SPLICE_SOCKETS).cast_mut().cast::<c_void>();
    let key = (&raw const peer_cookie).cast::<c_void>();
    // SAFETY: a lookup in a SOCKHASH returns a referenced socket or null; it
    // is released below on every path.
    let sk = unsafe { bpf_map_lookup_elem(map, key) };
    if sk.is_null() {
        return None;
    }
    // SAFETY: `sk` is a valid socket pointer for as long as we hold it.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk) }.cast::<u8>();
    let sent = if tp.is_null() {
        None
    } else {
        // SAFETY: `tp` points into `sk`, which we still hold; the offset comes
        // from the running kernel's BTF.
        let offset = unsafe { core::ptr::read_volatile(&raw const TCP_SOCK_WRITE_SEQ_OFFSET) } as usize;
        Some(unsafe { *tp.add(offset).cast::<u32>() })
    };
    // SAFETY: releases the reference taken by the lookup.
    unsafe { bpf_sk_release(sk.cast::<c_void>()) };
    sent
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
