//! Why a connection was not spliced: one value per reason, each the label of
//! its `packet_fallbacks_total{reason}` count. The connection carries on, on
//! the next plane, as it would have without this one.

/// Why a connection stays on the next plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// A connection is over IPv6: the program rewrites IPv4 only.
    NotIpv4,
    /// A connection is over loopback, which the program is not attached to
    /// (its packets cross no interface a peer sits behind).
    Loopback,
    /// The flow map has no room for two more entries.
    FlowTableFull,
    /// No packet of a peer reached the program during the switch: it
    /// arrives by an interface the program is not attached to.
    PeerNotSeen,
    /// A socket still held unread, unsent or unacknowledged bytes when the
    /// switch gave up waiting.
    NotQuiescent,
    /// A peer had closed or reset its connection before the switch.
    PeerClosed,
    /// The connection ended (a peer closed or reset it) while it was
    /// relayed by hand, before it had lived or carried enough to be worth
    /// the switch (`--packet-switch-after`, `--packet-switch-after-bytes`):
    /// the next plane carries its end. Most short connections end so.
    ShortLived,
    /// One connection negotiated timestamps and the other did not: the
    /// option cannot be added to or removed from a packet in place.
    TimestampsOnOneSide,
    /// A segment one peer may send (the MSS the proxy advertised to it) is
    /// larger than the other side's path takes (a smaller MTU there).
    MssDiffers,
    /// A side uses microsecond timestamps: no offset maps them onto a
    /// millisecond clock.
    MicrosecondTimestamps,
    /// A socket option or a map operation of the switch failed (logged).
    SwitchFailed,
}

impl Fallback {
    /// Every reason, in the order the metrics list them.
    pub const ALL: [Self; 11] = [
        Self::NotIpv4,
        Self::Loopback,
        Self::FlowTableFull,
        Self::PeerNotSeen,
        Self::NotQuiescent,
        Self::PeerClosed,
        Self::ShortLived,
        Self::TimestampsOnOneSide,
        Self::MssDiffers,
        Self::MicrosecondTimestamps,
        Self::SwitchFailed,
    ];

    /// The metrics label.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::NotIpv4 => "not_ipv4",
            Self::Loopback => "loopback",
            Self::FlowTableFull => "flow_table_full",
            Self::PeerNotSeen => "peer_not_seen",
            Self::NotQuiescent => "not_quiescent",
            Self::PeerClosed => "peer_closed",
            Self::ShortLived => "short_lived",
            Self::TimestampsOnOneSide => "timestamps_on_one_side",
            Self::MssDiffers => "mss_differs",
            Self::MicrosecondTimestamps => "microsecond_timestamps",
            Self::SwitchFailed => "switch_failed",
        }
    }

    /// Its place in [`Self::ALL`].
    #[must_use]
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|&f| f == self).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_place_and_label() {
        for (i, reason) in Fallback::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i);
        }
        let mut labels: Vec<_> = Fallback::ALL.iter().map(|f| f.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Fallback::ALL.len());
    }
}
