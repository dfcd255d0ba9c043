//! The engine's errors.

use std::path::{Path, PathBuf};

use kiln_core::Digest;

/// What went wrong in the engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The image store failed.
    #[error(transparent)]
    Store(#[from] kiln_bake::Error),
    /// The state store failed (including "locked by …" and stale writes).
    #[error(transparent)]
    State(#[from] kiln_state::Error),
    /// The runtime driver failed.
    #[error(transparent)]
    Driver(#[from] kiln_driver::DriverError),
    /// The proxy failed.
    #[error(transparent)]
    Proxy(#[from] kiln_proxy::ProxyError),
    /// The team state backend refused or failed.
    #[error("{0}")]
    Remote(String),
    /// A release's image is not in the store.
    #[error("image {0} is not in the image store; bake it again (`kiln bake`)")]
    ImageMissing(Digest),
    /// A release's image failed verification; nothing is launched from it.
    #[error("image {image} is corrupt ({problem}); nothing is launched from it")]
    ImageCorrupt {
        /// The image.
        image: Digest,
        /// The first problem found.
        problem: String,
    },
    /// A saved plan does not belong to this state.
    #[error("{0}")]
    PlanRefused(String),
    /// A request named something that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request cannot be done now.
    #[error("{0}")]
    Conflict(String),
    /// State JSON could not be read or written.
    #[error("state document: {0}")]
    Json(#[from] serde_json::Error),
}

impl Error {
    /// A closure turning an I/O error on `path` into [`Error::Io`].
    pub fn io(
        action: &'static str,
        path: impl AsRef<Path>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.as_ref().to_owned();
        move |source| Error::Io {
            action,
            path,
            source,
        }
    }
}

/// Results of engine operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
