//! The answers of recent lookups, reused for at most `max_ttl`.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use super::Answer;

/// Names the answer cache holds at most (the upstreams and routes of a
/// configuration; more only if a reload keeps adding names).
const CACHED_NAMES_AT_MOST: usize = 1024;

/// Positive answers by name, each kept until its own TTL or `max_ttl` ends,
/// whichever is first; nothing with `max_ttl` 0. hickory caches as well,
/// but a lookup it answers from its cache still runs its whole lookup
/// machinery (futures, name parsing, cache locks) for every connection; this
/// is one lock and a clone. Failures are not kept here (hickory keeps
/// negative answers for up to `max_ttl`).
#[derive(Debug)]
pub(super) struct AnswerCache {
    max_ttl: Duration,
    answers: Mutex<HashMap<String, Answer>>,
}

impl AnswerCache {
    pub(super) fn new(max_ttl: Duration) -> Self {
        Self { max_ttl, answers: Mutex::default() }
    }

    pub(super) fn get(&self, name: &str, now: Instant) -> Option<Arc<[IpAddr]>> {
        if self.max_ttl.is_zero() {
            return None;
        }
        let answers = self.answers.lock().unwrap_or_else(PoisonError::into_inner);
        answers.get(name).filter(|(_, until)| *until > now).map(|(ips, _)| Arc::clone(ips))
    }

    /// Keeps `ips` for `name` until `valid_until` (the answer's TTL), at most `max_ttl` from `now`.
    pub(super) fn put(&self, name: &str, ips: Arc<[IpAddr]>, valid_until: Instant, now: Instant) {
        if self.max_ttl.is_zero() {
            return;
        }
        let until = valid_until.min(now + self.max_ttl);
        let mut answers = self.answers.lock().unwrap_or_else(PoisonError::into_inner);
        make_room(&mut answers, name, CACHED_NAMES_AT_MOST, |(_, until)| *until > now);
        answers.insert(name.to_owned(), (ips, until));
    }
}

/// Before `name` goes into `map`, which holds at most `at_most` names: when
/// full (and without `name`), the entries no longer `live` go, then, if it
/// is still full, all of them.
pub(super) fn make_room<V>(
    map: &mut HashMap<String, V>,
    name: &str,
    at_most: usize,
    live: impl Fn(&V) -> bool,
) {
    if map.len() >= at_most && !map.contains_key(name) {
        map.retain(|_, value| live(value));
        if map.len() >= at_most {
            map.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{IpAddr, Ipv4Addr},
        sync::Arc,
        time::{Duration, Instant},
    };

    use super::AnswerCache;

    fn ips(last: u8) -> Arc<[IpAddr]> {
        Arc::from([IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))])
    }

    #[test]
    fn an_answer_is_kept_until_its_ttl_or_max_ttl_whichever_ends_first() {
        let cache = AnswerCache::new(Duration::from_secs(5));
        let now = Instant::now();
        cache.put("api.example", ips(1), now + Duration::from_secs(60), now);
        assert_eq!(cache.get("api.example", now + Duration::from_secs(4)), Some(ips(1)));
        assert_eq!(cache.get("api.example", now + Duration::from_secs(5)), None, "max_ttl bounds a long TTL");
        cache.put("short.example", ips(2), now + Duration::from_secs(1), now);
        assert_eq!(cache.get("short.example", now), Some(ips(2)));
        assert_eq!(
            cache.get("short.example", now + Duration::from_secs(1)),
            None,
            "the record's TTL bounds it"
        );
        assert_eq!(cache.get("other.example", now), None);
    }

    #[test]
    fn a_new_answer_replaces_the_old_one() {
        let cache = AnswerCache::new(Duration::from_secs(5));
        let now = Instant::now();
        cache.put("api.example", ips(1), now + Duration::from_secs(60), now);
        cache.put("api.example", ips(2), now + Duration::from_secs(60), now);
        assert_eq!(cache.get("api.example", now), Some(ips(2)));
    }

    #[test]
    fn max_ttl_zero_keeps_nothing() {
        let cache = AnswerCache::new(Duration::ZERO);
        let now = Instant::now();
        cache.put("api.example", ips(1), now + Duration::from_secs(60), now);
        assert_eq!(cache.get("api.example", now), None);
    }

    #[test]
    fn a_full_cache_drops_expired_names_then_everything() {
        let cache = AnswerCache::new(Duration::from_secs(5));
        let now = Instant::now();
        for n in 0..super::CACHED_NAMES_AT_MOST {
            cache.put(&format!("n{n}.example"), ips(1), now + Duration::from_secs(60), now);
        }
        let later = now + Duration::from_secs(1);
        cache.put("new.example", ips(2), later + Duration::from_secs(60), later);
        assert_eq!(cache.get("new.example", later), Some(ips(2)));
        assert_eq!(cache.get("n0.example", later), None, "the full cache was emptied");
        let len = cache.answers.lock().unwrap().len();
        assert_eq!(len, 1);
    }
}
