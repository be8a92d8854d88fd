//! Queued admission: the per-model wait queues of inference requests that found every node
//! serving their model at capacity.
//!
//! [`FairQueue`] is one model's queue, a plain data structure: round-robin over the API keys
//! that have waiters, FIFO within a key. Every waiter keeps the sequence number it got when it
//! first queued, so a waiter that was woken but lost the race for the slot goes back to its old
//! place (the front of its key, its key first in the rotation), not to the back.
//!
//! [`SlotQueue`] holds the queues of all models and wakes waiters when slots free: the registry
//! calls [`SlotQueue::wake`] with the models of the node that freed them and how many, and
//! exactly that many waiters are taken off the queues and woken (no herd of waiters re-routing
//! for one slot). A waiter is a [`QueueEntry`]; dropping it (the client went away, the request
//! gave up) removes it from its queue at once, and a waiter woken for a slot it then did not
//! use passes the wake on to the next one.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

/// A waiter's place: the order it first queued in.
pub type Seq = u64;

/// One model's wait queue: round-robin over keys, FIFO within a key.
#[derive(Debug, Default)]
pub struct FairQueue {
    /// Keys with waiters, the next to be served first.
    rotation: VecDeque<String>,
    /// Each key's waiters by sequence number (the smallest is served first).
    per_key: HashMap<String, BTreeMap<Seq, u64>>,
    len: usize,
}

impl FairQueue {
    /// Waiters queued.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues waiter `id` of `key` at place `seq`; a key new to the queue takes its turn after
    /// the keys already waiting.
    pub fn push(&mut self, key: &str, seq: Seq, id: u64) {
        let waiters = self.per_key.entry(key.to_string()).or_default();
        if waiters.is_empty() {
            self.rotation.push_back(key.to_string());
        }
        if waiters.insert(seq, id).is_none() {
            self.len += 1;
        }
    }

    /// Puts back a waiter that was taken off but could not use its slot: at its old place in
    /// its key, and its key first in the rotation (where it was when the waiter was taken).
    pub fn requeue(&mut self, key: &str, seq: Seq, id: u64) {
        let waiters = self.per_key.entry(key.to_string()).or_default();
        if waiters.insert(seq, id).is_none() {
            self.len += 1;
        }
        if let Some(at) = self.rotation.iter().position(|k| k == key) {
            self.rotation.remove(at);
        }
        self.rotation.push_front(key.to_string());
    }

    /// Takes the next waiter: the first of the key whose turn it is; that key's turn then goes
    /// to the back of the rotation.
    pub fn pop(&mut self) -> Option<(String, Seq, u64)> {
        let key = self.rotation.pop_front()?;
        let waiters = self.per_key.get_mut(&key)?;
        let (seq, id) = waiters.pop_first()?;
        self.len -= 1;
        if waiters.is_empty() {
            self.per_key.remove(&key);
        } else {
            self.rotation.push_back(key.clone());
        }
        Some((key, seq, id))
    }

    /// Removes a waiter; whether it was queued.
    pub fn remove(&mut self, key: &str, seq: Seq) -> bool {
        let Some(waiters) = self.per_key.get_mut(key) else {
            return false;
        };
        if waiters.remove(&seq).is_none() {
            return false;
        }
        self.len -= 1;
        if waiters.is_empty() {
            self.per_key.remove(key);
            if let Some(at) = self.rotation.iter().position(|k| k == key) {
                self.rotation.remove(at);
            }
        }
        true
    }
}

/// The model's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull {
    pub depth: usize,
}

struct Waiter {
    notify: Arc<Notify>,
    model: String,
    key: String,
    seq: Seq,
    /// In its model's queue (not taken off by a wake).
    queued: bool,
    /// How many waiters passed the wake that woke it on ([`QueueEntry::pass_on`]).
    passes: u32,
}

/// A wake is passed on at most this many times: waiters that cannot use a node (the geofence)
/// must not hand one free slot around forever.
const MAX_PASSES: u32 = 8;

#[derive(Default)]
struct Inner {
    models: HashMap<String, FairQueue>,
    waiters: HashMap<u64, Waiter>,
    next_id: u64,
    next_seq: Seq,
    /// Where the next multi-model wake starts, so that models sharing nodes take turns.
    model_turn: usize,
}

/// The wait queues of all models (see the module docs).
#[derive(Default)]
pub struct SlotQueue {
    inner: Mutex<Inner>,
    /// Bumped by every wake: a request that saw the model saturated under an older epoch may
    /// have missed a slot freed before it queued, so it looks again at once.
    epoch: AtomicU64,
}

impl SlotQueue {
    pub fn new() -> SlotQueue {
        SlotQueue::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Read before routing; handed to [`SlotQueue::enqueue`].
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Queues a request of `key` for `model` (at most `max_depth` waiters per model).
    /// `epoch` is [`SlotQueue::epoch`] as read before the route that found no slot: if slots
    /// freed since, the entry comes back already woken (it routes again at once, keeping its
    /// place should it still find none).
    pub fn enqueue(
        self: &Arc<Self>,
        model: &str,
        key: &str,
        max_depth: usize,
        epoch: u64,
    ) -> Result<QueueEntry, QueueFull> {
        let mut inner = self.lock();
        let depth = inner.models.get(model).map_or(0, FairQueue::len);
        if depth >= max_depth {
            return Err(QueueFull { depth });
        }
        inner.next_id += 1;
        inner.next_seq += 1;
        let (id, seq) = (inner.next_id, inner.next_seq);
        let notify = Arc::new(Notify::new());
        let missed = self.epoch() != epoch;
        if missed {
            notify.notify_one();
        } else {
            inner
                .models
                .entry(model.to_string())
                .or_default()
                .push(key, seq, id);
        }
        inner.waiters.insert(
            id,
            Waiter {
                notify: notify.clone(),
                model: model.to_string(),
                key: key.to_string(),
                seq,
                queued: !missed,
                passes: 0,
            },
        );
        Ok(QueueEntry {
            queue: self.clone(),
            id,
            notify,
            served: false,
        })
    }

    /// `slots` slots freed on a node serving `models`: wakes up to that many waiters, taking
    /// the models in turn (a round-robin start across calls) and each model's waiters fairly.
    pub fn wake(&self, models: &[String], slots: u32) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        if slots == 0 || models.is_empty() {
            return;
        }
        let mut inner = self.lock();
        let mut left = slots;
        let start = inner.model_turn;
        inner.model_turn = inner.model_turn.wrapping_add(1);
        let mut idle = 0;
        let mut i = start;
        // Round-robin over the node's models until the slots are given out or no model has
        // waiters left.
        while left > 0 && idle < models.len() {
            let model = &models[i % models.len()];
            i = i.wrapping_add(1);
            match inner.take_one(model, 0) {
                Some(()) => {
                    left -= 1;
                    idle = 0;
                }
                None => idle += 1,
            }
        }
    }

    /// Waiters queued for `model` (not counting those woken and routing again).
    pub fn depth(&self, model: &str) -> usize {
        self.lock().models.get(model).map_or(0, FairQueue::len)
    }

    /// Every model with waiters and how many, sorted by model.
    pub fn depths(&self) -> Vec<(String, usize)> {
        let inner = self.lock();
        let mut v: Vec<_> = inner
            .models
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(m, q)| (m.clone(), q.len()))
            .collect();
        v.sort();
        v
    }

    /// Waiters known (queued, or woken and not yet done).
    pub fn waiters(&self) -> usize {
        self.lock().waiters.len()
    }
}

impl Inner {
    /// Takes `model`'s next waiter off the queue and wakes it (`passes`: see
    /// [`Waiter::passes`]).
    fn take_one(&mut self, model: &str, passes: u32) -> Option<()> {
        let q = self.models.get_mut(model)?;
        let (_, _, id) = q.pop()?;
        if q.is_empty() {
            self.models.remove(model);
        }
        let w = self.waiters.get_mut(&id)?;
        w.queued = false;
        w.passes = passes;
        w.notify.notify_one();
        Some(())
    }
}

/// A request's place in its model's queue; dropping it leaves the queue.
pub struct QueueEntry {
    queue: Arc<SlotQueue>,
    id: u64,
    notify: Arc<Notify>,
    /// It used the slot it was woken for: nothing to pass on when dropped.
    served: bool,
}

impl QueueEntry {
    /// Completes when a slot freed for this waiter (it is then off the queue).
    pub async fn woken(&self) {
        self.notify.notified().await
    }

    /// Whether the waiter is in its queue (not woken).
    pub fn is_queued(&self) -> bool {
        let inner = self.queue.lock();
        inner.waiters.get(&self.id).is_some_and(|w| w.queued)
    }

    /// The waiter was woken but found no slot (another request took it): back to its old
    /// place. `epoch` as for [`SlotQueue::enqueue`].
    pub fn requeue(&self, epoch: u64) {
        let mut inner = self.queue.lock();
        let Some(w) = inner.waiters.get(&self.id) else {
            return;
        };
        if w.queued {
            return;
        }
        if self.queue.epoch() != epoch {
            // A slot freed while it looked: look again.
            self.notify.notify_one();
            return;
        }
        let (model, key, seq) = (w.model.clone(), w.key.clone(), w.seq);
        inner
            .models
            .entry(model)
            .or_default()
            .requeue(&key, seq, self.id);
        if let Some(w) = inner.waiters.get_mut(&self.id) {
            w.queued = true;
        }
    }

    /// The waiter was woken for a slot it cannot use (the node is not one it may be served by):
    /// its model's next waiter gets the wake, and this one goes back to its place.
    pub fn pass_on(&self) {
        let mut inner = self.queue.lock();
        let Some(w) = inner.waiters.get(&self.id) else {
            return;
        };
        if w.queued {
            return;
        }
        let (model, key, seq, passes) = (w.model.clone(), w.key.clone(), w.seq, w.passes);
        if passes < MAX_PASSES {
            let _ = inner.take_one(&model, passes + 1);
        }
        inner
            .models
            .entry(model)
            .or_default()
            .requeue(&key, seq, self.id);
        if let Some(w) = inner.waiters.get_mut(&self.id) {
            w.queued = true;
        }
    }

    /// The waiter got its slot.
    pub fn served(mut self) {
        self.served = true;
    }
}

impl Drop for QueueEntry {
    fn drop(&mut self) {
        let mut inner = self.queue.lock();
        let Some(w) = inner.waiters.remove(&self.id) else {
            return;
        };
        if w.queued {
            if let Some(q) = inner.models.get_mut(&w.model) {
                q.remove(&w.key, w.seq);
                if q.is_empty() {
                    inner.models.remove(&w.model);
                }
            }
        } else if !self.served {
            // Woken for a slot it will not use: the next waiter may.
            let _ = inner.take_one(&w.model, w.passes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(q: &mut FairQueue) -> Vec<(String, u64)> {
        std::iter::from_fn(|| q.pop().map(|(k, _, id)| (k, id))).collect()
    }

    #[test]
    fn waiters_are_taken_round_robin_over_keys_and_fifo_within_a_key() {
        let mut q = FairQueue::default();
        // Key a queues 1,000 requests before key b's one.
        for i in 0..1_000 {
            q.push("a", i, i);
        }
        q.push("b", 1_000, 9_999);
        q.push("c", 1_001, 7_777);
        let order = drain(&mut q);
        assert_eq!(order.len(), 1_002);
        assert_eq!(order[0], ("a".to_string(), 0));
        // b's one request is second, not 1,001st.
        assert_eq!(order[1], ("b".to_string(), 9_999));
        assert_eq!(order[2], ("c".to_string(), 7_777));
        let a: Vec<u64> = order
            .iter()
            .filter(|(k, _)| k == "a")
            .map(|(_, id)| *id)
            .collect();
        assert_eq!(a, (0..1_000).collect::<Vec<_>>());
        assert!(q.is_empty());
    }

    #[test]
    fn a_requeued_waiter_gets_its_old_place_not_the_back() {
        let mut q = FairQueue::default();
        q.push("a", 1, 1);
        q.push("a", 2, 2);
        q.push("b", 3, 3);
        let (k, seq, id) = q.pop().unwrap();
        assert_eq!((k.as_str(), id), ("a", 1));
        q.requeue(&k, seq, id);
        assert_eq!(
            drain(&mut q).iter().map(|x| x.1).collect::<Vec<_>>(),
            [1, 3, 2]
        );
    }

    #[test]
    fn a_removed_waiter_leaves_no_trace() {
        let mut q = FairQueue::default();
        q.push("a", 1, 1);
        q.push("b", 2, 2);
        assert!(q.remove("a", 1));
        assert!(!q.remove("a", 1));
        assert!(!q.remove("zzz", 1));
        assert_eq!(q.len(), 1);
        assert_eq!(drain(&mut q), [("b".to_string(), 2)]);
    }

    fn models(m: &[&str]) -> Vec<String> {
        m.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_depth_is_bounded_per_model() {
        let q = Arc::new(SlotQueue::new());
        let e = q.epoch();
        let _a = q.enqueue("m", "k1", 2, e).unwrap();
        let _b = q.enqueue("m", "k2", 2, e).unwrap();
        assert_eq!(
            q.enqueue("m", "k3", 2, e).err(),
            Some(QueueFull { depth: 2 })
        );
        // Another model has its own bound.
        let _c = q.enqueue("other", "k3", 2, e).unwrap();
        assert_eq!(q.depths(), [("m".to_string(), 2), ("other".to_string(), 1)]);
    }

    #[tokio::test]
    async fn a_freed_slot_wakes_exactly_one_waiter_fairly() {
        let q = Arc::new(SlotQueue::new());
        let e = q.epoch();
        let a: Vec<_> = (0..3)
            .map(|_| q.enqueue("m", "a", 100, e).unwrap())
            .collect();
        let b = q.enqueue("m", "b", 100, e).unwrap();
        q.wake(&models(&["m"]), 1);
        // a's first waiter is woken; nobody else.
        a[0].woken().await;
        assert!(!a[0].is_queued());
        assert!(a[1].is_queued() && a[2].is_queued() && b.is_queued());
        q.wake(&models(&["m"]), 1);
        b.woken().await;
        assert!(a[1].is_queued());
        assert_eq!(q.depth("m"), 2);
        // Wakes for a model nobody waits for change nothing.
        q.wake(&models(&["x"]), 5);
        assert_eq!(q.depth("m"), 2);
    }

    #[tokio::test]
    async fn dropping_a_waiter_removes_it_from_the_queue_at_once() {
        let q = Arc::new(SlotQueue::new());
        let e = q.epoch();
        let a = q.enqueue("m", "a", 100, e).unwrap();
        let b = q.enqueue("m", "a", 100, e).unwrap();
        drop(a);
        assert_eq!(q.depth("m"), 1);
        assert_eq!(q.waiters(), 1);
        q.wake(&models(&["m"]), 1);
        b.woken().await;
        drop(b);
        assert_eq!(q.waiters(), 0);
        assert!(q.depths().is_empty());
    }

    #[tokio::test]
    async fn a_woken_waiter_dropped_without_its_slot_passes_the_wake_on() {
        let q = Arc::new(SlotQueue::new());
        let e = q.epoch();
        let a = q.enqueue("m", "a", 100, e).unwrap();
        let b = q.enqueue("m", "b", 100, e).unwrap();
        q.wake(&models(&["m"]), 1);
        a.woken().await;
        drop(a);
        b.woken().await;
        assert!(!b.is_queued());
        // Served: nothing passed on.
        let c = q.enqueue("m", "c", 100, q.epoch()).unwrap();
        b.served();
        assert!(c.is_queued());
    }

    #[tokio::test]
    async fn a_waiter_that_loses_the_race_requeues_at_its_place() {
        let q = Arc::new(SlotQueue::new());
        let e = q.epoch();
        let a1 = q.enqueue("m", "a", 100, e).unwrap();
        let a2 = q.enqueue("m", "a", 100, e).unwrap();
        let b = q.enqueue("m", "b", 100, e).unwrap();
        q.wake(&models(&["m"]), 1);
        a1.woken().await;
        let seen = q.epoch();
        a1.requeue(seen);
        assert!(a1.is_queued());
        q.wake(&models(&["m"]), 1);
        // a1 again, not b nor a2.
        a1.woken().await;
        assert!(a2.is_queued() && b.is_queued());
    }

    #[tokio::test]
    async fn a_slot_freed_between_route_and_queue_is_not_missed() {
        let q = Arc::new(SlotQueue::new());
        let seen = q.epoch();
        q.wake(&models(&["m"]), 1);
        let a = q.enqueue("m", "a", 100, seen).unwrap();
        // Already woken: it routes again at once.
        a.woken().await;
        assert!(!a.is_queued());
    }

    #[tokio::test]
    async fn a_wake_for_a_node_of_several_models_takes_them_in_turn() {
        let q = Arc::new(SlotQueue::new());
        let e = q.epoch();
        let m1 = q.enqueue("m1", "a", 100, e).unwrap();
        let m2 = q.enqueue("m2", "a", 100, e).unwrap();
        let _m1b = q.enqueue("m1", "a", 100, e).unwrap();
        q.wake(&models(&["m1", "m2"]), 2);
        m1.woken().await;
        m2.woken().await;
        assert_eq!(q.depths(), [("m1".to_string(), 1)]);
    }

    #[tokio::test]
    async fn pass_on_wakes_the_next_and_keeps_the_place() {
        let q = Arc::new(SlotQueue::new());
        let e = q.epoch();
        let a = q.enqueue("m", "a", 100, e).unwrap();
        let b = q.enqueue("m", "b", 100, e).unwrap();
        q.wake(&models(&["m"]), 1);
        a.woken().await;
        a.pass_on();
        b.woken().await;
        assert!(a.is_queued());
        assert_eq!(q.depth("m"), 1);
        // Two waiters that cannot use the slot hand it back and forth a bounded number of times.
        let (mut woken, mut queued) = (&b, &a);
        let mut passes = 1;
        loop {
            woken.pass_on();
            if queued.is_queued() {
                break;
            }
            std::mem::swap(&mut woken, &mut queued);
            passes += 1;
            assert!(passes <= MAX_PASSES);
        }
        assert_eq!(passes, MAX_PASSES);
        assert!(a.is_queued() && b.is_queued());
    }
}
