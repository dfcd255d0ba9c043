//! The crate's error type. Every message is lowercase, names the path, entry or digest at fault
//! and says what was expected.

use std::io;
use std::path::{Path, PathBuf};

use kiln_core::Digest;

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the store, layer writing, extraction and export.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A filesystem operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What kiln was doing, as a verb phrase ("read blob", "create directory").
        action: &'static str,
        /// The path it was doing it to.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },

    /// The directory has content but is not a kiln store.
    #[error(
        "{} is not a kiln store: it is a non-empty directory without an `oci-layout` file",
        path.display()
    )]
    NotAStore {
        /// The directory that was opened.
        path: PathBuf,
    },

    /// `try_lock` found the store locked.
    #[error("store is in use by another kiln process (lock file {})", path.display())]
    StoreInUse {
        /// The lock file.
        path: PathBuf,
    },

    /// A blob's bytes do not hash to its name.
    #[error("blob {digest} is corrupt: its content hashes to {found}")]
    CorruptBlob {
        /// The digest the blob is stored under.
        digest: Digest,
        /// What its content actually hashes to.
        found: Digest,
    },

    /// A blob that should be in the store is not.
    #[error("blob {digest} is missing from the store")]
    MissingBlob {
        /// The digest that was looked up.
        digest: Digest,
    },

    /// A JSON document could not be read or written.
    #[error("invalid JSON in {what}: {source}")]
    Json {
        /// The document, e.g. `index.json` or `blob sha256:…`.
        what: String,
        /// The parser's complaint.
        source: serde_json::Error,
    },

    /// No image matches a reference.
    #[error("no image matches `{reference}`{}", did_you_mean(.suggestion.as_deref()))]
    ImageNotFound {
        /// What the user asked for.
        reference: String,
        /// A similar tag name, if one exists.
        suggestion: Option<String>,
    },

    /// A digest prefix matches several images.
    #[error("`{reference}` is ambiguous: it matches {}", .candidates.join(", "))]
    AmbiguousReference {
        /// What the user asked for.
        reference: String,
        /// The digests it matches.
        candidates: Vec<String>,
    },

    /// A tar archive tried to write outside the extraction root, or through a symlink.
    #[error("tar entry {entry:?} {reason}")]
    Unsafe {
        /// The member name as written in the archive.
        entry: String,
        /// Why it was refused.
        reason: String,
    },

    /// A tar archive is malformed (as opposed to malicious).
    #[error("invalid tar archive: {detail}")]
    BadArchive {
        /// What was wrong.
        detail: String,
    },

    /// A file cannot be put in a layer.
    #[error(
        "cannot put {} in a layer: it is a {kind}, and only files, directories and symlinks can be \
         reproduced without privileges",
        path.display()
    )]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What it is ("fifo", "device node").
        kind: &'static str,
    },

    /// A file shrank while it was being copied into a layer.
    #[error(
        "layer entry {path} is short: expected {expected} bytes but the source ended after {found} \
         (did the file change while it was archived?)"
    )]
    ShortRead {
        /// The path inside the layer.
        path: String,
        /// The size written in the tar header.
        expected: u64,
        /// The bytes actually read.
        found: u64,
    },

    /// A `repo:tag` given for an export is not usable.
    #[error("invalid image name `{name}`: {reason}")]
    InvalidTag {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A value given to the store is not usable.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was given.
        what: String,
        /// What is wrong with it, and what was expected.
        reason: String,
    },

    /// A path given for a layer or an export is not usable.
    #[error("invalid path `{path}`: {reason}")]
    InvalidPath {
        /// The path as given.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

fn did_you_mean(suggestion: Option<&str>) -> String {
    suggestion
        .map(|s| format!("; did you mean `{s}`?"))
        .unwrap_or_default()
}

impl Error {
    /// An [`Error::Io`] for `action` on `path`.
    ///
    /// The path is only copied when the error happens, so this is cheap on hot paths.
    pub(crate) fn io<'p>(
        action: &'static str,
        path: &'p Path,
    ) -> impl FnOnce(io::Error) -> Error + 'p {
        move |source| Error::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}
