//! One module per command.

pub mod bake;
pub mod images;
pub mod validate;
