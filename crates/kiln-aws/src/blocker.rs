//! [`Blocker`]: AWS calls from synchronous code, whatever runtime (if any) it runs in.

use std::future::Future;

/// A small tokio runtime of its own for AWS calls. [`Blocker::block`] runs a future there
/// and waits for it, which works from plain threads and from a worker thread of another
/// runtime alike (the engine calls its driver and state backend synchronously from its own
/// runtime), where `Runtime::block_on` would panic.
#[derive(Debug)]
pub struct Blocker {
    /// `None` only while dropping.
    rt: Option<tokio::runtime::Runtime>,
}

impl Blocker {
    /// Starts the runtime: one worker thread named `name`.
    pub fn new(name: &str) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()?;
        Ok(Self { rt: Some(rt) })
    }

    /// Runs `fut` on this runtime and waits for it, blocking the calling thread. Never call
    /// it from this runtime's own thread.
    pub fn block<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle().spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .expect("the runtime lives as long as the Blocker that owns it")
    }

    /// Spawns `fut` on this runtime.
    pub fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        self.handle().spawn(fut);
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.rt
            .as_ref()
            .expect("the runtime is only taken while dropping")
            .handle()
    }
}

impl Drop for Blocker {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which tokio forbids inside another runtime (where the
        // engine may drop its driver): let its threads wind down on their own.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
