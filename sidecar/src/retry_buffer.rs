//! The memory that bodies kept for a retry share: a request's body is kept only while it fits
//! in what is left, so concurrent large requests cannot grow the sidecar past its memory limit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The memory all kept bodies share. A body is kept only when its whole declared size fits in
/// what is left; otherwise it streams through once and loses the retry, so concurrent large
/// requests cannot grow the sidecar past its memory limit.
pub struct RetryBuffer {
    left: AtomicUsize,
}

/// Bytes taken from the [`RetryBuffer`], given back on drop.
pub struct Reserved {
    buffer: Arc<RetryBuffer>,
    bytes: usize,
}

impl RetryBuffer {
    pub fn new(bytes: usize) -> Arc<Self> {
        Arc::new(Self { left: AtomicUsize::new(bytes) })
    }

    pub fn reserve(self: &Arc<Self>, bytes: usize) -> Option<Reserved> {
        self.left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| left.checked_sub(bytes))
            .ok()
            .map(|_| Reserved { buffer: self.clone(), bytes })
    }

    /// Bytes not kept by any request now.
    pub fn available(&self) -> usize {
        self.left.load(Ordering::Acquire)
    }
}

impl Reserved {
    /// Takes `bytes` more, if the buffer has them.
    pub fn grow(&mut self, bytes: usize) -> bool {
        let taken = self.buffer.left.fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| left.checked_sub(bytes));
        if taken.is_ok() {
            self.bytes += bytes;
        }
        taken.is_ok()
    }

    /// Gives back all it holds.
    pub fn shrink_to_zero(&mut self) {
        self.buffer.left.fetch_add(std::mem::take(&mut self.bytes), Ordering::AcqRel);
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.buffer.left.fetch_add(self.bytes, Ordering::AcqRel);
    }
}
