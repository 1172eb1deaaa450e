//! `lossy_link`: a test helper that makes a link lose about 1 % of the IPv4
//! TCP packets carrying data, so the receiver sees retransmissions that
//! partly overlap bytes it already has (with SACK off on the sender); or
//! another share, up to all of them (a receiver that takes nothing while
//! its ACKs and its own data still go out). Loaded only by the tests; the
//! daemon never attaches it.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::bpf_get_prandom_u32,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};

use crate::packet::{ETH_HLEN, ETH_P_IP, IPPROTO_TCP, IPV4_HLEN, bytes};

/// Packets dropped, per CPU.
#[map]
static LOSSY_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The share of data packets dropped, in 1/1000, set by user space after
/// loading (0: [`DROP_PER_MILLE`]).
#[map]
static LOSSY_PER_MILLE: Array<u32> = Array::with_max_entries(1, 0);

/// Drop probability in 1/1000 unless [`LOSSY_PER_MILLE`] says otherwise.
const DROP_PER_MILLE: u32 = 10;

#[xdp]
pub fn lossy_link(ctx: XdpContext) -> u32 {
    match try_lossy_link(&ctx) {
        Some(action) => action,
        None => xdp_action::XDP_PASS,
    }
}

fn try_lossy_link(ctx: &XdpContext) -> Option<u32> {
    let [hi, lo] = bytes::<2>(ctx, 12)?;
    if u16::from_be_bytes([hi, lo]) != ETH_P_IP {
        return Some(xdp_action::XDP_PASS);
    }
    let ip = bytes::<IPV4_HLEN>(ctx, ETH_HLEN)?;
    if ip[9] != IPPROTO_TCP {
        return Some(xdp_action::XDP_PASS);
    }
    let ip_header = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let tcp_flags = bytes::<14>(ctx, ETH_HLEN + ip_header)?;
    let tcp_header = usize::from(tcp_flags[12] >> 4) * 4;
    if total <= ip_header + tcp_header {
        return Some(xdp_action::XDP_PASS);
    }
    let per_mille = match LOSSY_PER_MILLE.get(0) {
        Some(&set) if set != 0 => set,
        _ => DROP_PER_MILLE,
    };
    // SAFETY: the helper has no preconditions.
    if unsafe { bpf_get_prandom_u32() } % 1000 >= per_mille {
        return Some(xdp_action::XDP_PASS);
    }
    if let Some(drops) = LOSSY_DROPS.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU map, written only here.
        unsafe { *drops += 1 };
    }
    Some(xdp_action::XDP_DROP)
}
