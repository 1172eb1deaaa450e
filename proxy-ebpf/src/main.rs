//! Kernel programs of splice-proxy.
//!
//! For now one program: the `sk_skb/stream_verdict` program that will splice
//! the two sockets of a connection. In this first stage it only counts the
//! skbs it sees and passes them to the socket's own receive queue, which proves
//! that the toolchain builds, loads and attaches end to end.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::sk_action,
    macros::{map, stream_verdict},
    maps::{PerCpuArray, SockHash},
    programs::SkBuffContext,
};
use aya_log_ebpf::{debug, trace};
use proxy_common::{SPLICE_SOCKETS_CAPACITY, VerdictStats};

/// Sockets whose skbs [`splice_verdict`] sees, keyed by socket cookie.
#[map]
static SPLICE_SOCKETS: SockHash<u64> = SockHash::with_max_entries(SPLICE_SOCKETS_CAPACITY, 0);

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
        stats.empty_skbs += 1;
        debug!(ctx, "zero-length skb");
    }
    Ok(sk_action::SK_PASS)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
