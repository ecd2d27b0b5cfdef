//! One waker per flow, so the driver services only the flows that became ready
//! instead of scanning every connection on every wake-up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Wake, Waker};

use super::Shared;

struct FlowWaker {
    id: u64,
    /// Already on the ready list: later wakes before the driver looks are free.
    queued: AtomicBool,
    shared: Arc<Shared>,
}

impl Wake for FlowWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.shared.ready.lock().push(self.id);
            self.shared.wake.notify_one();
        }
    }
}

/// The waker a flow registers with its smoltcp socket and its tokio socket.
pub(super) struct FlowWake {
    flag: Arc<FlowWaker>,
    waker: Waker,
}

impl FlowWake {
    pub(super) fn new(id: u64, shared: Arc<Shared>) -> FlowWake {
        let flag = Arc::new(FlowWaker {
            id,
            queued: AtomicBool::new(false),
            shared,
        });
        let waker = Waker::from(flag.clone());
        FlowWake { flag, waker }
    }

    pub(super) fn waker(&self) -> &Waker {
        &self.waker
    }

    /// Called just before the flow is serviced, so that anything happening during
    /// the service queues it again.
    pub(super) fn rearm(&self) {
        self.flag.queued.store(false, Ordering::Release);
    }

    pub(super) fn wake(&self) {
        self.waker.wake_by_ref();
    }
}
