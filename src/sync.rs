//! Locks come through here, so the whole crate agrees on one policy (and concurrency tests
//! can swap the primitives in one place): a panic in one request must not wedge the mount,
//! so a poisoned lock is taken over (its data is kept consistent by the transaction or the
//! single assignment that the panicking holder was doing). The order in which the core
//! takes its locks is in docs/architecture.md ("Locks").

use std::collections::HashSet;
use std::hash::Hash;
use std::time::Duration;

pub use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Waits on `condvar`, giving the guard back.
pub fn wait<'a, T>(condvar: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    condvar
        .wait(guard)
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Waits on `condvar` for at most `timeout`, giving the guard back either way.
pub fn wait_timeout<'a, T>(
    condvar: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> MutexGuard<'a, T> {
    condvar
        .wait_timeout(guard, timeout)
        .map(|(guard, _)| guard)
        .unwrap_or_else(|poisoned| poisoned.into_inner().0)
}

/// A value one thread fills once and others wait for: `OnceLock::wait`, which needs a
/// newer Rust than ours. Its lock is a leaf.
pub struct Slot<T> {
    value: Mutex<Option<T>>,
    filled: Condvar,
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Slot {
            value: Mutex::new(None),
            filled: Condvar::new(),
        }
    }
}

impl<T: Clone> Slot<T> {
    /// Fills the slot, unless it is filled already.
    pub fn fill(&self, value: T) {
        let mut slot = lock(&self.value);
        if slot.is_none() {
            *slot = Some(value);
            self.filled.notify_all();
        }
    }

    /// The value, once the slot is filled.
    pub fn wait(&self) -> T {
        let mut slot = lock(&self.value);
        loop {
            if let Some(value) = slot.as_ref() {
                return value.clone();
            }
            slot = wait(&self.filled, slot);
        }
    }
}

/// Keys some thread is working on (a block being loaded or fetched): others wait for that
/// work, or skip it, rather than doing it a second time.
pub struct Claims<K> {
    keys: Mutex<HashSet<K>>,
    done: Condvar,
}

impl<K> Default for Claims<K> {
    fn default() -> Self {
        Claims {
            keys: Mutex::new(HashSet::new()),
            done: Condvar::new(),
        }
    }
}

impl<K: Hash + Eq + Copy> Claims<K> {
    /// Claims `key`, unless someone holds it.
    pub fn try_claim(&self, key: K) -> Option<Claim<'_, K>> {
        lock(&self.keys).insert(key).then(|| Claim {
            claims: self,
            keys: vec![key],
        })
    }

    /// Claims `keys` in order up to the first one someone else holds.
    pub fn claim_until_taken(&self, keys: impl IntoIterator<Item = K>) -> Claim<'_, K> {
        let mut held = lock(&self.keys);
        let keys = keys
            .into_iter()
            .take_while(|&key| held.insert(key))
            .collect();
        Claim { claims: self, keys }
    }

    /// Waits while someone holds `key`.
    pub fn wait_for(&self, key: &K) {
        let mut held = lock(&self.keys);
        while held.contains(key) {
            held = wait(&self.done, held);
        }
    }
}

/// Keys claimed from [`Claims`], released (and their waiters woken) when dropped.
pub struct Claim<'a, K: Hash + Eq> {
    claims: &'a Claims<K>,
    keys: Vec<K>,
}

impl<K: Hash + Eq> Claim<'_, K> {
    pub fn keys(&self) -> &[K] {
        &self.keys
    }
}

impl<K: Hash + Eq> Drop for Claim<'_, K> {
    fn drop(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        let mut held = lock(&self.claims.keys);
        for key in &self.keys {
            held.remove(key);
        }
        drop(held);
        self.claims.done.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_gives_its_first_value_to_those_waiting_and_to_those_after() {
        let slot = std::sync::Arc::new(Slot::default());
        let waiter = {
            let slot = std::sync::Arc::clone(&slot);
            std::thread::spawn(move || slot.wait())
        };
        std::thread::sleep(Duration::from_millis(20));
        slot.fill(1);
        slot.fill(2);
        assert_eq!(waiter.join().expect("waiter"), 1);
        assert_eq!(slot.wait(), 1);
    }

    #[test]
    fn claims_are_held_until_dropped_and_a_run_stops_at_a_taken_key() {
        let claims = Claims::default();
        let one = claims.try_claim(1).expect("free");
        assert!(claims.try_claim(1).is_none());
        let run = claims.claim_until_taken([3, 4, 1, 5]);
        assert_eq!(run.keys(), [3, 4]);
        assert!(
            claims.try_claim(5).is_some(),
            "5 came after a taken key: not claimed"
        );
        drop(one);
        drop(run);
        claims.wait_for(&3);
        let waiter = std::thread::scope(|scope| {
            let held = claims.try_claim(7).expect("free");
            let waiter = scope.spawn(|| {
                claims.wait_for(&7);
                claims.try_claim(7).is_some()
            });
            std::thread::sleep(Duration::from_millis(20));
            drop(held);
            waiter.join().expect("waiter")
        });
        assert!(waiter, "the key is free once its claim is dropped");
    }
}
