//! Pause events from the verdict program's ring buffer.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use aya::maps::{MapData, RingBuf};
use proxy_common::FlowEvent;
use tokio::{io::unix::AsyncFd, sync::Notify};

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
