//! One module per command.

pub mod audit;
pub mod bake;
pub mod deploy;
pub mod drift;
pub mod images;
pub mod inspect;
pub mod policy;
pub mod rollout;
pub mod server;
pub mod validate;
