//! Names and `#[repr(C)]` types shared by `proxy-ebpf` (kernel) and
//! `proxy-user` (daemon). Everything here is `no_std`, has a fixed layout, no
//! `bool`, and explicit padding, so both sides read the same bytes.
#![no_std]

/// Names of the programs in the kernel object, as `aya` looks them up.
pub mod program {
    /// `sk_skb/stream_verdict` program attached to [`super::map::SPLICE_SOCKETS`].
    pub const SPLICE_VERDICT: &str = "splice_verdict";
}

/// Names of the maps in the kernel object.
pub mod map {
    /// SOCKHASH of the sockets whose skbs the verdict program sees, keyed by socket cookie.
    pub const SPLICE_SOCKETS: &str = "SPLICE_SOCKETS";
    /// Per-CPU array with one [`super::VerdictStats`] slot; user space sums the CPUs.
    pub const VERDICT_STATS: &str = "VERDICT_STATS";
}

/// Capacity of [`map::SPLICE_SOCKETS`]: two sockets per spliced connection.
pub const SPLICE_SOCKETS_CAPACITY: u32 = 65_536;

/// Counters the verdict program keeps per CPU; user space adds the CPUs up.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictStats {
    /// skbs the verdict program was run on.
    pub skbs: u64,
    /// Payload bytes in those skbs.
    pub bytes: u64,
    /// Zero-length skbs (a FIN with no data).
    pub empty_skbs: u64,
}

impl VerdictStats {
    /// Field-wise sum, used to add up the per-CPU slots.
    #[must_use]
    pub const fn add(self, other: Self) -> Self {
        Self {
            skbs: self.skbs.wrapping_add(other.skbs),
            bytes: self.bytes.wrapping_add(other.bytes),
            empty_skbs: self.empty_skbs.wrapping_add(other.empty_skbs),
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `VerdictStats` is `#[repr(C)]`, made only of `u64`s (no padding,
    // no invalid bit patterns), so any byte pattern of its size is a valid value.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::VerdictStats {}
}

#[cfg(test)]
mod tests {
    use super::VerdictStats;

    #[test]
    fn layout_is_three_u64_without_padding() {
        assert_eq!(core::mem::size_of::<VerdictStats>(), 24);
        assert_eq!(core::mem::align_of::<VerdictStats>(), 8);
    }

    #[test]
    fn add_sums_each_field() {
        let a = VerdictStats { skbs: 1, bytes: 10, empty_skbs: 0 };
        let b = VerdictStats { skbs: 2, bytes: 5, empty_skbs: 1 };
        assert_eq!(a.add(b), VerdictStats { skbs: 3, bytes: 15, empty_skbs: 1 });
    }
}
