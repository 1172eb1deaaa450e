//! Lookups in flight, shared: a connection that needs a name while a lookup
//! of it is already on its way from the same thread waits for that answer
//! instead of sending a query of its own. The answer still arrives after
//! the connection did, so with `dns_max_ttl` 0 every connection is served
//! from an answer newer than itself; a burst of connections costs one query
//! instead of one each (HAProxy's `do-resolve` shares lookups the same way).
//!
//! Per thread, like the resolvers: a worker's connections share its
//! lookups without waking another thread. Only an answer is shared; when
//! the lookup fails or its connection goes away first, each waiting
//! connection asks for itself, so every error names its own cause.

use std::cell::RefCell;

use tokio::sync::watch;

use super::Answer;

/// What waiting connections see: `None` while the lookup runs; then
/// `Some(None)` (failed: ask yourself) or `Some(Some(answer))`.
type Outcome = Option<Option<Answer>>;

/// A lookup in flight: whose (the resolver's settings, by address) and of
/// which name, and where its outcome is sent.
struct Flight {
    owner: usize,
    name: Box<str>,
    outcome: watch::Receiver<Outcome>,
}

thread_local! {
    /// This thread's lookups in flight (a handful at most: one per name
    /// being looked up right now).
    static FLIGHTS: RefCell<Vec<Flight>> = const { RefCell::new(Vec::new()) };
}

/// How a lookup goes: it joins one in flight, or it is the one.
pub(super) enum Role {
    Waiting(watch::Receiver<Outcome>),
    Leading(Leader),
}

/// The lookup others may wait for; it leaves the thread's list when it
/// finishes or is dropped (a dropped one tells its waiters to ask for
/// themselves).
pub(super) struct Leader {
    outcome: watch::Sender<Outcome>,
    /// The listed end, to find this flight's entry again.
    listed: watch::Receiver<Outcome>,
}

/// Joins the lookup of `name` by `owner` in flight on this thread, or
/// starts one. A listed flight whose leader is gone (its task moved to
/// another thread of a multi-threaded runtime before it ended) is replaced.
pub(super) fn join_or_lead(owner: usize, name: &str) -> Role {
    FLIGHTS.with_borrow_mut(|flights| {
        if let Some(at) = flights.iter().position(|f| f.owner == owner && *f.name == *name) {
            if flights[at].outcome.has_changed().is_ok() {
                return Role::Waiting(flights[at].outcome.clone());
            }
            flights.swap_remove(at);
        }
        let (outcome, listed) = watch::channel(None);
        flights.push(Flight { owner, name: name.into(), outcome: listed.clone() });
        Role::Leading(Leader { outcome, listed })
    })
}

/// Waits for the lookup joined: its answer, or `None` if it failed or its
/// connection went away (then the caller asks for itself).
pub(super) async fn wait(mut outcome: watch::Receiver<Outcome>) -> Option<Answer> {
    let seen = outcome.wait_for(Option::is_some).await.ok()?;
    seen.clone().flatten()
}

impl Leader {
    /// Hands the lookup's answer (`None`: it failed) to those waiting.
    pub(super) fn finish(self, answer: Option<Answer>) {
        self.outcome.send_replace(Some(answer));
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        // A thread being torn down has no list left to clean.
        let _ = FLIGHTS.try_with(|flights| {
            flights.borrow_mut().retain(|f| !f.outcome.same_channel(&self.listed));
        });
        // Waiters not yet told see the sender go and ask for themselves.
    }
}
