//! Lookups in flight, shared: a connection that needs a name while a lookup
//! of it is already on its way waits for that answer
//! instead of sending a query of its own. The answer still arrives after
//! the connection did, so with `dns_max_ttl` 0 every connection is served
//! from an answer newer than itself; a burst of connections costs one query
//! instead of one each (HAProxy's `do-resolve` shares lookups the same way).
//!
//! Process-wide: every worker's connections join the same lookup, as
//! HAProxy's threads join one `do-resolve`. A waiter on another worker is
//! woken across threads once per lookup, which costs less than the query
//! it did not send and lets it go on sooner. Only an answer is shared; when
//! the lookup fails or its connection goes away first, each waiting
//! connection asks for itself, so every error names its own cause.

use std::sync::{Mutex, MutexGuard, PoisonError};

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

/// The lookups in flight (a handful at most: one per name being looked up
/// right now); the lock is held only to search or edit the list.
static FLIGHTS: Mutex<Vec<Flight>> = Mutex::new(Vec::new());

/// The list; a panic while it was held left it consistent (every edit is
/// one call), so a poisoned lock is taken as it is.
fn flights() -> MutexGuard<'static, Vec<Flight>> {
    FLIGHTS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How a lookup goes: it joins one in flight, or it is the one.
pub(super) enum Role {
    Waiting(watch::Receiver<Outcome>),
    Leading(Leader),
}

/// The lookup others may wait for; it leaves the list when it
/// finishes or is dropped (a dropped one tells its waiters to ask for
/// themselves).
pub(super) struct Leader {
    outcome: watch::Sender<Outcome>,
    /// The listed end, to find this flight's entry again; `None` once it
    /// has left the list.
    listed: Option<watch::Receiver<Outcome>>,
}

/// Joins the lookup of `name` by `owner` in flight, or starts one. Only a
/// lookup still running is joined: its answer arrives after the joiner did.
/// A listed flight that has an outcome or whose leader is gone (neither
/// can be: a leader leaves the list before it answers, and when dropped)
/// is replaced, so a stale entry never serves an older answer nor makes a
/// waiter wait for nothing.
pub(super) fn join_or_lead(owner: usize, name: &str) -> Role {
    let mut flights = flights();
    if let Some(at) = flights.iter().position(|f| f.owner == owner && *f.name == *name) {
        let running = flights[at].outcome.has_changed().is_ok() && flights[at].outcome.borrow().is_none();
        if running {
            return Role::Waiting(flights[at].outcome.clone());
        }
        flights.swap_remove(at);
    }
    let (outcome, listed) = watch::channel(None);
    flights.push(Flight { owner, name: name.into(), outcome: listed.clone() });
    Role::Leading(Leader { outcome, listed: Some(listed) })
}

/// Waits for the lookup joined: its answer, or `None` if it failed or its
/// connection went away (then the caller asks for itself).
pub(super) async fn wait(mut outcome: watch::Receiver<Outcome>) -> Option<Answer> {
    let seen = outcome.wait_for(Option::is_some).await.ok()?;
    seen.clone().flatten()
}

impl Leader {
    /// Hands the lookup's answer (`None`: it failed) to those waiting. The
    /// flight leaves the list first: a connection of another worker that
    /// comes between must not join a lookup already answered (its answer
    /// would be older than that connection).
    pub(super) fn finish(mut self, answer: Option<Answer>) {
        self.unlist();
        self.outcome.send_replace(Some(answer));
    }

    /// Takes the flight off the list, once.
    fn unlist(&mut self) {
        if let Some(listed) = self.listed.take() {
            flights().retain(|f| !f.outcome.same_channel(&listed));
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        // A leader dropped unfinished leaves the list now, and its waiters
        // see the sender go and ask for themselves.
        self.unlist();
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{IpAddr, Ipv4Addr},
        sync::mpsc,
        thread,
        time::Instant,
    };

    use super::{Answer, Leader, Role, join_or_lead, wait};

    /// Starts the lookup of `name` by `owner` here and has a thread of its
    /// own (another worker) join it; returns once it has, with what its
    /// wait will give it.
    fn lead_with_a_waiter_elsewhere(
        owner: usize,
        name: &'static str,
    ) -> (Leader, thread::JoinHandle<Option<Answer>>) {
        let Role::Leading(leader) = join_or_lead(owner, name) else {
            panic!("nothing was in flight");
        };
        let (joined, told) = mpsc::channel();
        let waiter = thread::spawn(move || {
            let Role::Waiting(outcome) = join_or_lead(owner, name) else {
                panic!("the lookup in flight on another thread was not joined");
            };
            joined.send(()).unwrap();
            tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(wait(outcome))
        });
        told.recv().unwrap();
        (leader, waiter)
    }

    // Owners are the addresses of resolvers' settings; 1, 2 and 3 are none.

    #[test]
    fn a_lookup_on_one_worker_is_joined_from_another() {
        let (leader, waiter) = lead_with_a_waiter_elsewhere(1, "joined.example");
        let answer: Answer = ([IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7))].into(), Instant::now());
        leader.finish(Some(answer.clone()));
        assert_eq!(waiter.join().unwrap(), Some(answer));
        assert!(
            matches!(join_or_lead(1, "joined.example"), Role::Leading(_)),
            "a finished lookup left the list"
        );
    }

    #[test]
    fn a_listed_lookup_that_has_its_answer_is_not_joined() {
        let Role::Leading(leader) = join_or_lead(3, "answered.example") else {
            panic!("nothing was in flight");
        };
        // Answered but still listed, as `finish` would leave it if it
        // answered before leaving the list.
        leader.outcome.send_replace(Some(None));
        assert!(
            matches!(join_or_lead(3, "answered.example"), Role::Leading(_)),
            "an answered lookup was joined: its answer is older than the joiner"
        );
        drop(leader);
    }

    #[test]
    fn a_leader_gone_sends_the_other_worker_to_ask_for_itself() {
        let (leader, waiter) = lead_with_a_waiter_elsewhere(2, "dropped.example");
        drop(leader);
        assert_eq!(waiter.join().unwrap(), None);
    }
}
