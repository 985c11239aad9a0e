//! The waiting room of a route: one FIFO per priority class, strict priority
//! between them. Pure data structure; the limiter owns it under its mutex.
//!
//! Entries are keyed by a ticket number that grows with arrival, so within a
//! class the smallest key is the oldest waiter, and classes merged after a
//! reload keep their arrival order. Removing a waiter that left is
//! `O(classes × log depth)`.

use std::collections::BTreeMap;

#[derive(Debug)]
pub(crate) struct PriorityQueue<T> {
    /// `classes[0]` is the highest priority.
    classes: Vec<BTreeMap<u64, T>>,
    len: usize,
}

impl<T> PriorityQueue<T> {
    /// A queue with `classes` classes (at least one).
    pub(crate) fn new(classes: usize) -> Self {
        PriorityQueue {
            classes: (0..classes.max(1)).map(|_| BTreeMap::new()).collect(),
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[cfg(test)]
    pub(crate) fn class_count(&self) -> usize {
        self.classes.len()
    }

    /// `class` clamped to an existing class (the lowest for one past the end).
    pub(crate) fn clamp(&self, class: usize) -> usize {
        class.min(self.classes.len() - 1)
    }

    /// Waiters in each class, highest priority first.
    pub(crate) fn depths(&self) -> impl Iterator<Item = usize> + '_ {
        self.classes.iter().map(BTreeMap::len)
    }

    /// Adds a waiter with ticket `id` (larger than every earlier ticket).
    pub(crate) fn push(&mut self, class: usize, id: u64, item: T) {
        let class = self.clamp(class);
        if self.classes[class].insert(id, item).is_none() {
            self.len += 1;
        }
    }

    /// The oldest waiter of the highest-priority non-empty class.
    pub(crate) fn pop_next(&mut self) -> Option<(u64, T)> {
        let popped = self.classes.iter_mut().find_map(BTreeMap::pop_first);
        if popped.is_some() {
            self.len -= 1;
        }
        popped
    }

    /// Removes ticket `id`, wherever it is.
    pub(crate) fn remove(&mut self, id: u64) -> Option<T> {
        let removed = self.classes.iter_mut().find_map(|c| c.remove(&id));
        if removed.is_some() {
            self.len -= 1;
        }
        removed
    }

    /// The newest waiter of the lowest-priority non-empty class, if that
    /// class is strictly lower than `class`: the one a `class` newcomer
    /// displaces from a full queue.
    pub(crate) fn pop_displaceable(&mut self, class: usize) -> Option<(u64, T)> {
        let class = self.clamp(class);
        let lowest = self.classes.iter().rposition(|c| !c.is_empty())?;
        if lowest <= class {
            return None;
        }
        let popped = self.classes[lowest].pop_last();
        if popped.is_some() {
            self.len -= 1;
        }
        popped
    }

    /// The entry that arrived first, across all classes.
    pub(crate) fn oldest(&self) -> Option<&T> {
        self.classes
            .iter()
            .filter_map(|c| c.first_key_value())
            .min_by_key(|(id, _)| **id)
            .map(|(_, item)| item)
    }

    /// Changes the number of classes; waiters of classes that no longer
    /// exist join the new lowest class, in arrival order.
    pub(crate) fn resize(&mut self, classes: usize) {
        let classes = classes.max(1);
        while self.classes.len() > classes {
            if let Some(mut extra) = self.classes.pop() {
                if let Some(last) = self.classes.last_mut() {
                    last.append(&mut extra);
                }
            }
        }
        while self.classes.len() < classes {
            self.classes.push(BTreeMap::new());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_priority_then_fifo() {
        let mut q = PriorityQueue::new(3);
        q.push(2, 1, "batch-1");
        q.push(1, 2, "normal-1");
        q.push(2, 3, "batch-2");
        q.push(0, 4, "interactive-1");
        q.push(1, 5, "normal-2");
        let order: Vec<_> = std::iter::from_fn(|| q.pop_next().map(|(_, v)| v)).collect();
        assert_eq!(
            order,
            [
                "interactive-1",
                "normal-1",
                "normal-2",
                "batch-1",
                "batch-2"
            ]
        );
        assert!(q.is_empty());
    }

    #[test]
    fn remove_and_displace() {
        let mut q = PriorityQueue::new(3);
        q.push(1, 1, 'a');
        q.push(2, 2, 'b');
        q.push(2, 3, 'c');
        assert_eq!(q.oldest(), Some(&'a'));
        // A batch newcomer displaces nobody; a normal one displaces the newest batch.
        assert_eq!(q.pop_displaceable(2), None);
        assert_eq!(q.pop_displaceable(1), Some((3, 'c')));
        assert_eq!(q.remove(1), Some('a'));
        assert_eq!(q.remove(1), None);
        assert_eq!(q.len(), 1);
        assert_eq!(q.depths().collect::<Vec<_>>(), [0, 0, 1]);
        // Out-of-range classes are clamped to the lowest one.
        q.push(9, 4, 'd');
        assert_eq!(q.depths().collect::<Vec<_>>(), [0, 0, 2]);
    }

    #[test]
    fn resize_merges_into_the_lowest_class_in_arrival_order() {
        let mut q = PriorityQueue::new(3);
        q.push(2, 1, 'x');
        q.push(1, 2, 'y');
        q.push(2, 3, 'z');
        q.push(0, 4, 'w');
        q.resize(2);
        assert_eq!(q.class_count(), 2);
        let order: Vec<_> = std::iter::from_fn(|| q.pop_next().map(|(_, v)| v)).collect();
        assert_eq!(order, ['w', 'x', 'y', 'z']);
        q.resize(0);
        assert_eq!(q.class_count(), 1);
    }
}
