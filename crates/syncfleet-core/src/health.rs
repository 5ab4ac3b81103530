//! Readiness of this process, for `/readyz`: true while it is connected to
//! the broker and its databases and not draining.

use std::sync::atomic::{AtomicBool, Ordering};

static READY: AtomicBool = AtomicBool::new(false);

pub fn set_ready(ready: bool) {
    READY.store(ready, Ordering::Relaxed);
}

pub fn is_ready() -> bool {
    READY.load(Ordering::Relaxed)
}
