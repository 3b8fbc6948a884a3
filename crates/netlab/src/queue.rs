//! The forwarder's delay line: packets wait for their one-way delay (plus jitter) and leave in due
//! order; with no jitter every packet has the same delay, so they leave in arrival (FIFO) order. The
//! queue is bounded in bytes. Time is a `Duration` since an arbitrary origin so that tests drive it
//! with a fake clock.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

/// One queued packet: due time, arrival sequence (tie-break keeps FIFO among equal due times), bytes.
#[derive(Debug)]
struct Slot {
    due: Duration,
    seq: u64,
    data: Vec<u8>,
}

impl PartialEq for Slot {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Slot {}
impl PartialOrd for Slot {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Slot {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(o.due, o.seq))
    }
}

/// Why a packet was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// The queue already holds `max_bytes`.
    Full,
}

/// A delay line for one direction of the link.
#[derive(Debug)]
pub struct DelayQueue {
    delay: Duration,
    max_bytes: usize,
    heap: BinaryHeap<Reverse<Slot>>,
    bytes: usize,
    seq: u64,
    last_due: Duration,
}

impl DelayQueue {
    /// A queue that delays every packet by `delay` and holds at most `max_bytes`.
    pub fn new(delay: Duration, max_bytes: usize) -> DelayQueue {
        DelayQueue {
            delay,
            max_bytes,
            heap: BinaryHeap::new(),
            bytes: 0,
            seq: 0,
            last_due: Duration::ZERO,
        }
    }

    /// Queues `data` arriving at `now`, due at `now + delay + extra` (`extra` is the jitter sample;
    /// zero keeps FIFO order, as does a clock that steps back).
    pub fn push(&mut self, now: Duration, extra: Duration, data: Vec<u8>) -> Result<(), Rejected> {
        if self.bytes + data.len() > self.max_bytes {
            return Err(Rejected::Full);
        }
        let mut due = now + self.delay + extra;
        if extra.is_zero() {
            // Without jitter, never leave before an earlier packet.
            due = due.max(self.last_due);
        }
        self.last_due = self.last_due.max(due);
        self.bytes += data.len();
        self.heap.push(Reverse(Slot {
            due,
            seq: self.seq,
            data,
        }));
        self.seq += 1;
        Ok(())
    }

    /// The due time of the next packet, if any.
    pub fn next_due(&self) -> Option<Duration> {
        self.heap.peek().map(|Reverse(s)| s.due)
    }

    /// The next packet if it is due at `now`.
    pub fn pop_due(&mut self, now: Duration) -> Option<Vec<u8>> {
        if self.next_due()? > now {
            return None;
        }
        let Reverse(s) = self.heap.pop()?;
        self.bytes -= s.data.len();
        Some(s.data)
    }

    /// Bytes queued.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Packets queued.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn delays_and_keeps_fifo() {
        let mut q = DelayQueue::new(ms(10), 1 << 20);
        q.push(ms(0), Duration::ZERO, vec![1]).unwrap();
        q.push(ms(1), Duration::ZERO, vec![2]).unwrap();
        q.push(ms(1), Duration::ZERO, vec![3]).unwrap();
        assert_eq!(q.next_due(), Some(ms(10)));
        assert_eq!(q.pop_due(ms(9)), None);
        assert_eq!(q.pop_due(ms(10)), Some(vec![1]));
        assert_eq!(q.pop_due(ms(10)), None);
        assert_eq!(q.next_due(), Some(ms(11)));
        assert_eq!(q.pop_due(ms(50)), Some(vec![2]));
        assert_eq!(q.pop_due(ms(50)), Some(vec![3]));
        assert!(q.is_empty());
        assert_eq!(q.next_due(), None);
    }

    #[test]
    fn a_clock_step_back_does_not_reorder() {
        let mut q = DelayQueue::new(ms(5), 1 << 20);
        q.push(ms(10), Duration::ZERO, vec![1]).unwrap();
        q.push(ms(8), Duration::ZERO, vec![2]).unwrap();
        assert_eq!(q.pop_due(ms(15)), Some(vec![1]));
        assert_eq!(q.pop_due(ms(15)), Some(vec![2]));
    }

    #[test]
    fn jitter_may_reorder() {
        let mut q = DelayQueue::new(ms(10), 1 << 20);
        q.push(ms(0), ms(5), vec![1]).unwrap();
        q.push(ms(1), ms(1), vec![2]).unwrap();
        assert_eq!(q.pop_due(ms(12)), Some(vec![2]));
        assert_eq!(q.pop_due(ms(14)), None);
        assert_eq!(q.pop_due(ms(15)), Some(vec![1]));
    }

    #[test]
    fn bounded_in_bytes() {
        let mut q = DelayQueue::new(ms(1), 3000);
        q.push(ms(0), Duration::ZERO, vec![0; 1500]).unwrap();
        q.push(ms(0), Duration::ZERO, vec![0; 1500]).unwrap();
        assert_eq!(
            q.push(ms(0), Duration::ZERO, vec![0; 1]),
            Err(Rejected::Full)
        );
        assert_eq!((q.len(), q.bytes()), (2, 3000));
        q.pop_due(ms(1)).unwrap();
        assert_eq!(q.bytes(), 1500);
        q.push(ms(1), Duration::ZERO, vec![0; 1500]).unwrap();
    }
}
