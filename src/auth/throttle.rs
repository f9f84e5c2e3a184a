//! Brute-force protection for password checks: failures are counted per client address
//! (per /64 for IPv6) and per user name; each failure is answered after a growing delay,
//! and after `max_failures` the address or name is locked out for `lockout`.
//!
//! Only requests that carry credentials are throttled: a lockout never blocks anonymous
//! pulls. A password already verified and cached still works during a lockout of its
//! user name, so an attacker cannot stop a real pusher's upload by guessing badly.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// First delay after a failure; doubles with each further one.
const BASE_DELAY: Duration = Duration::from_millis(100);
/// Longest delay before a failure is answered.
const MAX_DELAY: Duration = Duration::from_secs(3);
/// Failures older than this are forgotten.
const FAILURE_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Entries kept before old ones are swept.
const SWEEP_AT: usize = 50_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Addr(IpAddr),
    User(String),
}

#[derive(Debug)]
struct Entry {
    failures: u32,
    last: Instant,
    locked_until: Option<Instant>,
}

/// Per-address and per-user failure counters.
#[derive(Debug)]
pub struct Throttle {
    max_failures: u32,
    lockout: Duration,
    entries: Mutex<HashMap<Key, Entry>>,
}

/// IPv6 clients usually own a whole /64: count them as one.
fn addr_key(ip: IpAddr) -> Key {
    match ip {
        IpAddr::V4(_) => Key::Addr(ip),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => Key::Addr(IpAddr::V4(v4)),
            None => {
                let s = v6.segments();
                Key::Addr(IpAddr::V6(std::net::Ipv6Addr::new(
                    s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                )))
            }
        },
    }
}

impl Throttle {
    pub fn new(max_failures: u32, lockout: Duration) -> Self {
        Throttle {
            max_failures: max_failures.max(1),
            lockout,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        match self.entries.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// `Err(retry_after)` while the address or the user name is locked out.
    pub fn check(&self, ip: IpAddr, user: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let entries = self.lock();
        let mut wait = None;
        for key in [addr_key(ip), Key::User(user.to_owned())] {
            if let Some(until) = entries.get(&key).and_then(|e| e.locked_until)
                && until > now
            {
                let left = until - now;
                wait = Some(wait.map_or(left, |w: Duration| w.max(left)));
            }
        }
        wait.map_or(Ok(()), Err)
    }

    /// Record a failure; returns how long to wait before answering it.
    pub fn failed(&self, ip: IpAddr, user: &str) -> Duration {
        let now = Instant::now();
        let mut entries = self.lock();
        if entries.len() >= SWEEP_AT {
            entries.retain(|_, e| {
                now.duration_since(e.last) < FAILURE_WINDOW
                    || e.locked_until.is_some_and(|u| u > now)
            });
        }
        let mut worst = 0;
        for key in [addr_key(ip), Key::User(user.to_owned())] {
            let e = entries.entry(key).or_insert(Entry {
                failures: 0,
                last: now,
                locked_until: None,
            });
            let expired_lock = e.locked_until.is_some_and(|u| u <= now);
            if expired_lock || now.duration_since(e.last) >= FAILURE_WINDOW {
                e.failures = 0;
                e.locked_until = None;
            }
            e.failures += 1;
            e.last = now;
            if e.failures >= self.max_failures {
                e.locked_until = Some(now + self.lockout);
            }
            worst = worst.max(e.failures);
        }
        let shift = worst.saturating_sub(1).min(16);
        (BASE_DELAY * (1u32 << shift)).min(MAX_DELAY)
    }

    /// A success clears the address's and the user's failures.
    pub fn succeeded(&self, ip: IpAddr, user: &str) {
        let mut entries = self.lock();
        entries.remove(&addr_key(ip));
        entries.remove(&Key::User(user.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_locks_then_clears() {
        let t = Throttle::new(4, Duration::from_secs(60));
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        assert!(t.check(ip, "mark").is_ok());
        assert_eq!(t.failed(ip, "mark"), Duration::from_millis(100));
        assert_eq!(t.failed(ip, "mark"), Duration::from_millis(200));
        assert_eq!(t.failed(ip, "mark"), Duration::from_millis(400));
        assert!(t.check(ip, "mark").is_ok());
        t.failed(ip, "mark");
        assert!(t.check(ip, "mark").is_err(), "locked after 4");
        // The name is locked from another address too, and the address for another name.
        let other: IpAddr = "198.51.100.7".parse().expect("ip");
        assert!(t.check(other, "mark").is_err());
        assert!(t.check(ip, "alice").is_err());
        assert!(t.check(other, "alice").is_ok());
        t.succeeded(ip, "mark");
        assert!(t.check(ip, "mark").is_ok());
    }

    #[test]
    fn ipv6_counts_per_64_and_delay_is_capped() {
        let t = Throttle::new(100, Duration::from_secs(60));
        let a: IpAddr = "2001:db8::1".parse().expect("ip");
        let b: IpAddr = "2001:db8::ffff".parse().expect("ip");
        let mut last = Duration::ZERO;
        for i in 0..20 {
            last = t.failed(if i % 2 == 0 { a } else { b }, &format!("u{i}"));
        }
        assert_eq!(last, MAX_DELAY);
    }
}
