//! kiln's control plane: the async shell around the pure core.
//!
//! The [`Engine`] owns a project's running world — state, the runtime driver, the proxy — and
//! changes it only by applying a plan or through its reconcile loop, which observes instances
//! and health, asks [`kiln_core::rollout`] what to do, persists the decision, and then acts.
//! [`server::serve`] puts it behind a Unix socket; [`client::Client`] is the CLI's side.

mod analysis;
pub mod api;
pub mod client;
mod drift;
mod engine;
mod error;
mod launch;
mod notify;
pub mod paths;
mod reconcile;
mod recover;
pub mod remote;
mod rollback;
pub mod rootfs;
pub mod server;

pub use engine::{Engine, EngineConfig, Halt, actor};
pub use error::{Error, Result};
pub use paths::Paths;
