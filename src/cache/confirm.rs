//! Which repository the upstream confirmed to have which digest, and when. A
//! confirmation older than the window is stale (asked again); stale entries are swept
//! when the map has doubled since the last sweep, so that each insert costs O(1) on
//! average even when every entry is fresh (a sweep at a fixed size would then scan the
//! whole map on every insert).

use std::collections::HashMap;
use std::time::{Duration, Instant};

pub struct Confirmations {
    map: HashMap<(String, String), Instant>,
    window: Duration,
    /// The size that triggers the next sweep.
    sweep_at: usize,
    /// The smallest `sweep_at`: below it nothing is swept.
    floor: usize,
}

impl Confirmations {
    pub fn new(window: Duration, floor: usize) -> Self {
        Confirmations {
            map: HashMap::new(),
            window,
            sweep_at: floor,
            floor,
        }
    }

    pub fn is_fresh(&self, repo: &str, digest: &str) -> bool {
        // The key is a pair of owned strings, so a lookup copies both (two small
        // allocations); a borrowed lookup would need a map per repository.
        self.map
            .get(&(repo.to_owned(), digest.to_owned()))
            .is_some_and(|at| at.elapsed() < self.window)
    }

    pub fn confirm(&mut self, repo: &str, digest: &str) {
        if self.map.len() >= self.sweep_at {
            let window = self.window;
            self.map.retain(|_, at| at.elapsed() < window);
            self.sweep_at = (self.map.len() * 2).max(self.floor);
        }
        self.map
            .insert((repo.to_owned(), digest.to_owned()), Instant::now());
    }

    pub fn forget(&mut self, repo: &str, digest: &str) {
        self.map.remove(&(repo.to_owned(), digest.to_owned()));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_until_the_window_passes_and_forgotten_on_request() {
        let mut c = Confirmations::new(Duration::from_millis(200), 4);
        c.confirm("a/x", "sha256:1");
        assert!(c.is_fresh("a/x", "sha256:1"));
        assert!(!c.is_fresh("b/x", "sha256:1"), "per repository");
        c.forget("a/x", "sha256:1");
        assert!(!c.is_fresh("a/x", "sha256:1"));
        c.confirm("a/x", "sha256:2");
        std::thread::sleep(Duration::from_millis(250));
        assert!(!c.is_fresh("a/x", "sha256:2"), "stale after the window");
    }

    #[test]
    fn sweeps_stale_entries_and_grows_when_all_are_fresh() {
        let mut c = Confirmations::new(Duration::from_millis(300), 4);
        for i in 0..4 {
            c.confirm("r", &format!("d{i}"));
        }
        std::thread::sleep(Duration::from_millis(350));
        // Four stale entries: the fifth insert sweeps them.
        c.confirm("r", "d4");
        assert_eq!(c.len(), 1);
        // All fresh: the map grows past the floor, and the next sweep waits until it
        // has doubled (not a scan per insert).
        for i in 5..20 {
            c.confirm("r", &format!("d{i}"));
        }
        assert_eq!(c.len(), 16);
        assert!(c.sweep_at >= 16, "sweep_at {}", c.sweep_at);
        assert!(c.is_fresh("r", "d19") && c.is_fresh("r", "d4"));
    }
}
