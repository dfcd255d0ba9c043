//! kiln's pure core: the config language, the typed model and content digests.
//!
//! This crate does no I/O. It turns config text into a checked [`model::Config`] together with
//! every diagnostic found, and it names content by [`digest::Digest`].
//!
//! ```
//! use kiln_core::config::{load, Source};
//!
//! let src = Source { name: "kiln.hcl".into(), text: r#"
//!     project = "shop"
//!     image "web" { base = "scratch" }
//! "#.into() };
//! let (config, diagnostics) = load(&src, &[]);
//! assert!(diagnostics.is_empty());
//! assert_eq!(config.unwrap().images["web"].name, "web");
//! ```

pub mod analysis;
pub mod clock;
pub mod config;
pub mod diag;
pub mod digest;
pub mod drift;
pub mod model;
pub mod plan;
pub mod rollout;
pub mod state;

pub use diag::{Diagnostic, Loc, Severity};
pub use digest::Digest;
