//! Request batching, after Karpenter's `pkg/batcher`: callers submit one key each; a
//! background task collects the keys that arrive within a window after the first (or until
//! the batch is full), runs one operation for all of them, and hands each caller its result.
//!
//! At most [`MAX_IN_FLIGHT`] batches of one batcher run at a time; while they wait (for the
//! rate limiter, say) new keys pile up in the channel and the next batch takes them all, so
//! batches grow as the API gets slower instead of multiplying.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};

/// Batches of one batcher running at the same time.
pub const MAX_IN_FLIGHT: usize = 4;

type Waiter<K, V> = (K, oneshot::Sender<V>);

/// The operation a batcher runs: all the (distinct) keys of a batch in, a value per key out.
pub type BatchFn<K, V> =
    Arc<dyn Fn(Vec<K>) -> Pin<Box<dyn Future<Output = HashMap<K, V>> + Send>> + Send + Sync>;

/// The submitting side of a batcher; the background task ends when every clone is dropped.
pub struct Batcher<K, V> {
    tx: mpsc::UnboundedSender<Waiter<K, V>>,
}

impl<K, V> Clone for Batcher<K, V> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<K, V> Batcher<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + 'static,
{
    /// Spawns the collecting task on the current tokio runtime. `missing` answers a key the
    /// operation returned no value for.
    pub fn spawn(
        window: Duration,
        max_batch: usize,
        run: BatchFn<K, V>,
        missing: fn(&K) -> V,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(collect(rx, window, max_batch.max(1), run, missing));
        Self { tx }
    }

    /// Submits `key` and waits for its batch's result; `None` if the batcher is gone.
    pub async fn submit(&self, key: K) -> Option<V> {
        let (tx, rx) = oneshot::channel();
        self.tx.send((key, tx)).ok()?;
        rx.await.ok()
    }
}

async fn collect<K, V>(
    mut rx: mpsc::UnboundedReceiver<Waiter<K, V>>,
    window: Duration,
    max_batch: usize,
    run: BatchFn<K, V>,
    missing: fn(&K) -> V,
) where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut distinct: HashSet<K> = HashSet::from([first.0.clone()]);
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + window;
        // Whatever is already queued joins at once (the batch may have grown while we waited
        // for a slot), then whatever arrives before the window closes.
        while distinct.len() < max_batch {
            match rx.try_recv() {
                Ok(item) => {
                    distinct.insert(item.0.clone());
                    batch.push(item);
                }
                Err(_) => break,
            }
        }
        while distinct.len() < max_batch {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(item)) => {
                    distinct.insert(item.0.clone());
                    batch.push(item);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let run = run.clone();
        tokio::spawn(async move {
            let (keys, waiters) = group(batch);
            let mut results = run(keys).await;
            for (key, senders) in waiters {
                let value = results.remove(&key).unwrap_or_else(|| missing(&key));
                for sender in senders {
                    let _ = sender.send(value.clone());
                }
            }
            drop(permit);
        });
    }
}

/// The distinct keys of a batch in arrival order, and the callers waiting for each.
pub fn group<K: Eq + Hash + Clone, S>(batch: Vec<(K, S)>) -> (Vec<K>, HashMap<K, Vec<S>>) {
    let mut keys = Vec::new();
    let mut waiters: HashMap<K, Vec<S>> = HashMap::new();
    for (key, sender) in batch {
        let entry = waiters.entry(key.clone()).or_default();
        if entry.is_empty() {
            keys.push(key);
        }
        entry.push(sender);
    }
    (keys, waiters)
}

/// Splits `items` into chunks of at most `size` (at least 1) items.
pub fn chunks<T: Clone>(items: &[T], size: usize) -> Vec<Vec<T>> {
    items.chunks(size.max(1)).map(<[T]>::to_vec).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn group_merges_repeated_keys() {
        let (keys, waiters) = group(vec![("a", 1), ("b", 2), ("a", 3)]);
        assert_eq!(keys, vec!["a", "b"]);
        assert_eq!(waiters["a"], vec![1, 3]);
        assert_eq!(waiters["b"], vec![2]);
    }

    #[test]
    fn chunks_respect_the_size() {
        let items: Vec<u32> = (0..450).collect();
        let c = chunks(&items, 200);
        assert_eq!(
            c.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![200, 200, 50]
        );
        assert!(chunks::<u32>(&[], 200).is_empty());
        assert_eq!(chunks(&[1, 2], 0).len(), 2);
    }

    fn counting(calls: Arc<AtomicUsize>) -> BatchFn<u32, u32> {
        Arc::new(move |keys: Vec<u32>| {
            let calls = calls.clone();
            Box::pin(async move {
                calls.fetch_add(1, Ordering::SeqCst);
                keys.into_iter()
                    .filter(|k| *k != 99)
                    .map(|k| (k, k * 10))
                    .collect()
            })
        })
    }

    #[tokio::test]
    async fn concurrent_submissions_share_one_call() {
        let calls = Arc::new(AtomicUsize::new(0));
        // A long window and a batch size equal to the number of distinct keys: the batch is
        // flushed by size, whatever the machine's speed.
        let b = Batcher::spawn(Duration::from_secs(30), 10, counting(calls.clone()), |_| 0);
        let results = futures::future::join_all((0..10u32).map(|k| {
            let b = b.clone();
            async move { b.submit(k).await }
        }))
        .await;
        assert_eq!(
            results,
            (0..10u32).map(|k| Some(k * 10)).collect::<Vec<_>>()
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn repeated_keys_and_missing_values() {
        let calls = Arc::new(AtomicUsize::new(0));
        let b = Batcher::spawn(Duration::from_secs(30), 2, counting(calls.clone()), |_| 7);
        let (a, b2, c) = tokio::join!(b.submit(5), b.submit(5), b.submit(99));
        assert_eq!((a, b2, c), (Some(50), Some(50), Some(7)));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_task_ends_with_the_last_handle() {
        let calls = Arc::new(AtomicUsize::new(0));
        let run = counting(calls.clone());
        let weak = Arc::downgrade(&run);
        let b = Batcher::spawn(Duration::from_millis(1), 10, run, |_| 0);
        assert_eq!(b.submit(1).await, Some(10));
        drop(b);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while weak.upgrade().is_some() {
            assert!(std::time::Instant::now() < deadline, "the task never ended");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
