//! A map by digest that knows the order of use: the least recently used entry is
//! found without a scan (the cache's disk index and its manifests in memory).

use std::collections::{BTreeMap, HashMap};

pub struct Lru<V> {
    map: HashMap<String, (V, u64)>,
    /// Keys by their last use (a tick of `tick`, unique).
    order: BTreeMap<u64, String>,
    tick: u64,
}

impl<V> Default for Lru<V> {
    fn default() -> Self {
        Lru {
            map: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
        }
    }
}

impl<V> Lru<V> {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn contains(&self, k: &str) -> bool {
        self.map.contains_key(k)
    }

    /// Without counting as a use.
    pub fn peek(&self, k: &str) -> Option<&V> {
        self.map.get(k).map(|(v, _)| v)
    }

    /// Without counting as a use.
    pub fn peek_mut(&mut self, k: &str) -> Option<&mut V> {
        self.map.get_mut(k).map(|(v, _)| v)
    }

    /// Counting as a use now.
    pub fn touch(&mut self, k: &str) -> Option<&mut V> {
        let (v, used) = self.map.get_mut(k)?;
        self.tick += 1;
        let key = self.order.remove(used).unwrap_or_else(|| k.to_owned());
        *used = self.tick;
        self.order.insert(self.tick, key);
        Some(v)
    }

    /// As the most recently used; returns what it replaces.
    pub fn insert(&mut self, k: String, v: V) -> Option<V> {
        self.tick += 1;
        self.order.insert(self.tick, k.clone());
        let (old, used) = self.map.insert(k, (v, self.tick))?;
        self.order.remove(&used);
        Some(old)
    }

    /// [`Lru::insert`], then the least recently used out until at most `cap` stay.
    pub fn insert_within(&mut self, k: String, v: V, cap: usize) {
        self.insert(k, v);
        while self.len() > cap {
            self.pop_oldest();
        }
    }

    pub fn remove(&mut self, k: &str) -> Option<V> {
        let (v, used) = self.map.remove(k)?;
        self.order.remove(&used);
        Some(v)
    }

    pub fn oldest(&self) -> Option<&str> {
        self.order.first_key_value().map(|(_, k)| k.as_str())
    }

    pub fn pop_oldest(&mut self) -> Option<(String, V)> {
        let (_, k) = self.order.pop_first()?;
        let (v, _) = self.map.remove(&k)?;
        Some((k, v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.map.keys()
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.map.values().map(|(v, _)| v)
    }

    /// Least recently used first.
    pub fn by_use(&self) -> impl Iterator<Item = (&str, &V)> {
        self.order
            .values()
            .filter_map(|k| self.map.get(k).map(|(v, _)| (k.as_str(), v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_comes_first_and_nothing_is_counted_twice() {
        let mut l = Lru::default();
        l.insert("a".to_owned(), 1);
        l.insert("b".to_owned(), 2);
        assert_eq!(l.oldest(), Some("a"));
        assert!(l.peek("a").is_some());
        assert_eq!(l.oldest(), Some("a"), "a peek is not a use");
        l.touch("a");
        assert_eq!(l.oldest(), Some("b"));
        assert_eq!(l.insert("b".to_owned(), 3), Some(2));
        let order: Vec<_> = l.by_use().map(|(k, v)| (k.to_owned(), *v)).collect();
        assert_eq!(order, [("a".to_owned(), 1), ("b".to_owned(), 3)]);
        assert_eq!(l.pop_oldest(), Some(("a".to_owned(), 1)));
        assert_eq!(l.remove("b"), Some(3));
        assert_eq!((l.len(), l.map.len(), l.order.len()), (0, 0, 0));
    }

    #[test]
    fn the_least_recently_used_leaves_a_full_map() {
        let mut m = Lru::default();
        let put = |m: &mut Lru<u8>, d: &str| m.insert_within(d.to_owned(), 0, 2);
        put(&mut m, "a");
        put(&mut m, "b");
        assert!(m.touch("a").is_some(), "a used after b");
        put(&mut m, "c");
        assert!(m.touch("b").is_none(), "b was the least recently used");
        assert!(m.touch("a").is_some() && m.touch("c").is_some());
        // Putting one again does not count it twice.
        put(&mut m, "c");
        assert_eq!((m.map.len(), m.order.len()), (2, 2));
    }
}
