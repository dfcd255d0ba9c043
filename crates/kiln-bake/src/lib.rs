//! Baking content-addressed OCI images, and the store that keeps them.

pub mod bake;
pub mod error;
pub mod export;
mod import;
pub mod inputs;
pub mod layer;
pub mod manifest;
pub mod oci;
pub mod record;
pub mod revoke;
pub mod sandbox;
pub mod store;
pub mod unpack;
pub mod verify_tree;

pub use bake::{BakeError, BakeEvent, BakeSettings, bake};
pub use error::{Error, Result};
pub use export::{ExportFormat, export};
pub use layer::{
    Compression, DiffOptions, LayerBlobWriter, LayerWriter, Ownership, Snapshot, TreeOptions,
    TreeStats, snapshot, write_diff, write_tree,
};
pub use manifest::{Entry, Kind, Manifest};
pub use record::{CacheEntry, GitInfo, ImageRecord, LayerRecord, StepRecord};
pub use store::{BlobProblem, BlobWriter, GcReport, Problem, Store, StoreLock};
pub use unpack::{UnpackOptions, UnpackStats, apply_layers, unpack};
pub use verify_tree::{Change, FileKind, Report, StatCache, verify_paths, verify_tree};
