//! Pause events from the verdict program's ring buffer.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use proxy_common::FlowEvent;
use tokio::{io::unix::AsyncFd, sync::Notify};

use super::SockmapPlane;

/// How often the verdict counters are read for pause events the ring buffer
/// had no room for.
const LOST_EVENTS_CHECK: Duration = Duration::from_secs(1);

/// Reads pause events, counts them in `received` and wakes the direction
/// waiting for each.
pub(super) async fn dispatch_pauses(
    mut events: AsyncFd<RingBuf<MapData>>,
    waiters: Arc<Mutex<HashMap<u64, Arc<Notify>>>>,
    received: Arc<AtomicU64>,
) {
    while let Ok(mut guard) = events.readable_mut().await {
        // Clear first, then drain: an event that lands while we drain wakes us again.
        guard.clear_ready();
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            let Some(event) = parse_event(&item) else { continue };
            received.fetch_add(1, Ordering::Relaxed);
            let waiter =
                waiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&event.cookie).cloned();
            if let Some(waiter) = waiter {
                waiter.notify_one();
            }
        }
    }
}

fn parse_event(bytes: &[u8]) -> Option<FlowEvent> {
    let cookie = u64::from_ne_bytes(bytes.get(0..8)?.try_into().ok()?);
    let reason = u32::from_ne_bytes(bytes.get(8..12)?.try_into().ok()?);
    Some(FlowEvent { cookie, reason, _pad: 0 })
}

/// The safety net under the ring buffer: when the program could not send a
/// pause event (the ring was full), every direction is woken to read its own
/// pause flag, since a paused direction nobody reads closes its window and
/// waits for ever. Ends with the plane.
pub(super) async fn watch_lost_events(plane: Weak<SockmapPlane>) {
    let mut seen = 0;
    let mut tick = tokio::time::interval(LOST_EVENTS_CHECK);
    loop {
        tick.tick().await;
        let Some(plane) = plane.upgrade() else { return };
        let lost = match plane.kernel().verdict_stats() {
            Ok(stats) => stats.lost_events,
            Err(error) => {
                tracing::debug!(%error, "reading the verdict counters for lost pause events");
                continue;
            }
        };
        if lost > seen {
            tracing::warn!(
                lost = lost - seen,
                "pause events lost (ring buffer full); every direction reads its pause flag"
            );
            for waiter in plane.waiters().values() {
                waiter.notify_one();
            }
            seen = lost;
        }
    }
}
