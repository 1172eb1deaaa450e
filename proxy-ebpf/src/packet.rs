//! Bounds-checked reads from an XDP packet, in a form the verifier accepts:
//! the packet pointer plus the offset is compared with `data_end` before the
//! load.

use aya_ebpf::programs::XdpContext;

/// The `N` bytes at `offset` of the packet, if the packet holds them.
#[inline(always)]
pub fn bytes<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<[u8; N]> {
    let start = ctx.data() + offset;
    if start + N > ctx.data_end() {
        return None;
    }
    // SAFETY: the range was checked against data_end just above.
    Some(unsafe { *(start as *const [u8; N]) })
}

/// The big-endian `u16` at `offset`, if the packet holds it.
#[inline(always)]
pub fn be16(ctx: &XdpContext, offset: usize) -> Option<u16> {
    bytes::<2>(ctx, offset).map(u16::from_be_bytes)
}
