use std::net::SocketAddr;

/// Errors of the proxy's control API. Request-time failures never surface here: they become
/// 404/502/503 responses and metrics.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The caller asked for a balancer that is already listening (a user or engine mistake).
    #[error("balancer {name} is already listening on {addr}")]
    AlreadyBound {
        /// The balancer.
        name: String,
        /// Where it listens.
        addr: SocketAddr,
    },
    /// The address could not be bound (in use, not local, no permission); retrying may help once
    /// the other listener goes away.
    #[error("cannot listen on {addr} for balancer {name}")]
    Bind {
        /// The balancer.
        name: String,
        /// The address asked for.
        addr: SocketAddr,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// A traffic layer other than this proxy (a cloud load balancer) could not do what was
    /// asked.
    #[error("balancer {name}: {detail}")]
    Remote {
        /// The balancer.
        name: String,
        /// What went wrong, as the remote API said.
        detail: String,
    },
}
