//! The bridge between a VM's dispatch queue and tokio.
//!
//! VZ objects belong to the serial queue their `VZVirtualMachine` was made
//! with: every call and every property read must run there, and VZ's
//! completion handlers and delegate methods run there too. The rest of the
//! helper is tokio. The bridge is two small pieces:
//!
//! - [`OnQueue<T>`]: a retained VZ object that may cross threads (so tokio
//!   tasks can hold it) but whose contents are reached only through the
//!   `unsafe` [`OnQueue::get`], whose contract is "on the VM's queue"; it is
//!   released on that queue too.
//! - [`VmQueue::run`]: posts a closure to the queue (`dispatch_async`) and
//!   awaits its result through a tokio oneshot channel; a closure that
//!   starts an asynchronous VZ operation hands the [`Reply`] to the
//!   operation's completion block ([`RcBlock`](block2::RcBlock)), which
//!   answers once.
//!
//! No lock is held across an await, and no tokio thread ever blocks on
//! the queue.

use std::sync::Mutex;

use dispatch2::{DispatchQueue, DispatchQueueAttr, DispatchRetained};
use objc2::rc::Retained;
use tokio::sync::oneshot;

use crate::error::VzFailure;

/// One VM's serial dispatch queue.
#[derive(Debug, Clone)]
pub struct VmQueue {
    queue: DispatchRetained<DispatchQueue>,
}

impl VmQueue {
    /// A new serial queue labelled `label`.
    pub fn new(label: &str) -> Self {
        Self {
            queue: DispatchQueue::new(label, DispatchQueueAttr::SERIAL),
        }
    }

    /// The queue, for `initWithConfiguration:queue:`.
    pub fn dispatch_queue(&self) -> &DispatchQueue {
        &self.queue
    }

    /// Wraps `value`, which belongs to this queue.
    ///
    /// # Safety
    ///
    /// `value` must be an object this queue owns: made on it, or a VZ object
    /// of the VM made with it.
    pub unsafe fn adopt<T: 'static>(&self, value: Retained<T>) -> OnQueue<T> {
        OnQueue {
            value: Some(value),
            queue: self.queue.clone(),
        }
    }

    /// Runs `work` on the queue and returns what it answers through its
    /// [`Reply`]: at once, or later from a completion handler.
    ///
    /// # Errors
    ///
    /// A helper [`VzFailure`] if `work` dropped its [`Reply`] unanswered.
    pub async fn run<T, F>(&self, work: F) -> Result<T, VzFailure>
    where
        T: Send + 'static,
        F: FnOnce(Reply<T>) + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.queue.exec_async(move || work(Reply::new(tx)));
        rx.await
            .map_err(|_| VzFailure::helper("the VM's queue dropped a request unanswered"))
    }
}

/// The answer to one [`VmQueue::run`], given at most once (a completion
/// handler is an `Fn` block and could in principle be called again).
#[derive(Debug)]
pub struct Reply<T> {
    tx: Mutex<Option<oneshot::Sender<T>>>,
}

impl<T> Reply<T> {
    fn new(tx: oneshot::Sender<T>) -> Self {
        Self {
            tx: Mutex::new(Some(tx)),
        }
    }

    /// Answers; later calls do nothing.
    pub fn send(&self, value: T) {
        let tx = match self.tx.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(tx) = tx {
            // The waiter may have given up (a timeout): nothing to do then.
            let _ = tx.send(value);
        }
    }
}

/// A retained Objective-C object that belongs to a VM's queue; see the
/// module docs.
#[derive(Debug)]
pub struct OnQueue<T: 'static> {
    /// `Some` until dropped.
    value: Option<Retained<T>>,
    queue: DispatchRetained<DispatchQueue>,
}

// SAFETY: the object is reached only through `get`, whose contract is to be
// on the owning queue, so moving the handle between threads never lets two
// threads use the object; retain and release (the only operations done
// off the queue: `clone`, and nothing else, since `drop` posts the release
// to the queue) are atomic in the Objective-C runtime.
unsafe impl<T: 'static> Send for OnQueue<T> {}
// SAFETY: as for `Send`: a shared reference gives nothing but `get`
// (unsafe, on the queue) and `clone` (an atomic retain).
unsafe impl<T: 'static> Sync for OnQueue<T> {}

impl<T: 'static> OnQueue<T> {
    /// The object.
    ///
    /// # Safety
    ///
    /// The caller runs on the object's queue (inside a closure given to
    /// [`VmQueue::run`], or a completion handler or delegate method of its
    /// VM).
    pub unsafe fn get(&self) -> &T {
        self.value
            .as_deref()
            .expect("the value is only taken in drop")
    }
}

impl<T: objc2::Message + 'static> Clone for OnQueue<T> {
    fn clone(&self) -> Self {
        Self {
            value: self.value.clone(),
            queue: self.queue.clone(),
        }
    }
}

impl<T: 'static> Drop for OnQueue<T> {
    fn drop(&mut self) {
        if let Some(value) = self.value.take() {
            let value = Released(value);
            // The last release (and so `dealloc`) happens on the queue.
            self.queue.exec_async(move || value.release());
        }
    }
}

/// A retained object on its way to its queue to be released there.
struct Released<T: 'static>(Retained<T>);

// SAFETY: the object is not touched on the way; it is only released, on
// its own queue, by the closure that carries it.
unsafe impl<T: 'static> Send for Released<T> {}

impl<T: 'static> Released<T> {
    /// Releases the object (a method, so that a closure captures the whole
    /// wrapper, not its non-`Send` field).
    fn release(self) {
        drop(self.0);
    }
}
