//! Places held per identity, with keys removed as soon as their count
//! returns to zero, so the map holds only identities that have something
//! running or queued and never grows with the number of callers seen.

use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, Default)]
pub(crate) struct IdentityCounts {
    counts: HashMap<Arc<str>, u32>,
}

impl IdentityCounts {
    /// Places `identity` holds now.
    pub(crate) fn get(&self, identity: &str) -> u32 {
        self.counts.get(identity).copied().unwrap_or(0)
    }

    /// Adds one place and returns the interned key, to give back to
    /// [`IdentityCounts::release`]. Allocates only for a new identity.
    pub(crate) fn acquire(&mut self, identity: &str) -> Arc<str> {
        if let Some((key, count)) = self.counts.get_key_value(identity) {
            let key = Arc::clone(key);
            let count = count + 1;
            self.counts.insert(Arc::clone(&key), count);
            return key;
        }
        let key: Arc<str> = Arc::from(identity);
        self.counts.insert(Arc::clone(&key), 1);
        key
    }

    /// Gives one place back; the key goes when its count reaches zero.
    pub(crate) fn release(&mut self, identity: &str) {
        if let Some(count) = self.counts.get_mut(identity) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.counts.remove(identity);
            }
        }
    }

    /// Identities holding at least one place.
    pub(crate) fn len(&self) -> usize {
        self.counts.len()
    }
}
