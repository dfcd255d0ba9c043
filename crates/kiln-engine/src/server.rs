//! `kiln server`: the engine behind a Unix socket.

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tokio::sync::watch;

use crate::api::{ApiError, ApplyRequest, RollbackRequest, RolloutCommand, ShutdownRequest};
use crate::engine::Engine;
use crate::error::{Error, Result};
use kiln_core::rollout::Command;

/// Serves the control API on the project's socket and runs the reconcile loop until a shutdown
/// request or SIGINT/SIGTERM. On a signal, instances keep running (the next server re-adopts
/// them); on `kiln down`, they are stopped first.
pub async fn serve(engine: Engine) -> Result<()> {
    let paths = engine.shared.cfg.paths.clone();
    let socket = paths.socket();
    let listener = bind_private(&socket)?;
    // Idle time (for `idle_exit`) counts from when clients can reach the server, not from
    // the recovery before it.
    engine.touch();
    std::fs::write(paths.pid_file(), std::process::id().to_string())
        .map_err(Error::io("write", paths.pid_file()))?;

    let (stop_tx, stop_rx) = watch::channel(false);
    // Set by `kiln down`: stop the instances once the reconcile loop has stopped, so that it
    // cannot launch replacements for the instances being stopped.
    let stop_instances = Arc::new(AtomicBool::new(false));
    let reconcile = {
        let engine = engine.clone();
        let mut rx = stop_rx.clone();
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            engine
                .run(async move {
                    let _ = rx.wait_for(|stop| *stop).await;
                })
                .await;
            // The loop also ends by itself (idle, or the team backend lost): so does the server.
            let _ = stop_tx.send(true);
        })
    };

    let signals = {
        let stop_tx = stop_tx.clone();
        async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                Some(()) = async { match term.as_mut() { Some(t) => t.recv().await, None => std::future::pending().await } } => {}
            }
            let _ = stop_tx.send(true);
        }
    };
    tokio::spawn(signals);

    let mut stop_rx_accept = stop_rx.clone();
    loop {
        tokio::select! {
            _ = stop_rx_accept.wait_for(|stop| *stop) => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let engine = engine.clone();
                let stop_tx = stop_tx.clone();
                let stop_instances = stop_instances.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let engine = engine.clone();
                        let stop_tx = stop_tx.clone();
                        let stop_instances = stop_instances.clone();
                        async move {
                            Ok::<_, Infallible>(route(&engine, req, &stop_tx, &stop_instances).await)
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service);
                    if let Err(e) = conn.await {
                        tracing::debug!("control connection: {e}");
                    }
                });
            }
        }
    }
    // No new connections from here on; a new server may bind the socket path while this one
    // finishes stopping (the client waits for this process to exit).
    drop(listener);
    let _ = std::fs::remove_file(&socket);
    let _ = reconcile.await;
    let result = if stop_instances.load(Ordering::SeqCst) {
        engine.stop_all().await
    } else {
        Ok(())
    };
    let _ = std::fs::remove_file(paths.pid_file());
    result
}

/// Binds the socket so that only the owner can connect: the socket file is created inside the
/// owner-only `.kiln` directory and then made 0600 itself.
fn bind_private(socket: &Path) -> Result<UnixListener> {
    if socket.exists() {
        // A socket left by a server that was killed: nothing listens on it any more.
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Err(Error::Conflict(format!(
                "a kiln server is already running on {}",
                socket.display()
            )));
        }
        std::fs::remove_file(socket).map_err(Error::io("remove", socket))?;
    }
    let listener = UnixListener::bind(socket).map_err(Error::io("listen on", socket))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(Error::io("set permissions of", socket))?;
    Ok(listener)
}

async fn route(
    engine: &Engine,
    req: Request<Incoming>,
    stop: &watch::Sender<bool>,
    stop_instances: &AtomicBool,
) -> Response<Full<Bytes>> {
    engine.touch();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let result = match (req.method().clone(), path.as_str()) {
        (Method::GET, "/v1/status") => json(&engine.status().await),
        (Method::GET, "/v1/events") => {
            let after = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("after="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            engine.events(after).and_then(|e| json(&e))
        }
        (Method::GET, "/v1/drift") => {
            let param = |key: &str| {
                query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                    .map(str::to_owned)
            };
            let service = param("service").filter(|s| !s.is_empty());
            let full = param("full").is_some_and(|v| v == "1" || v == "true");
            engine
                .drift(service.as_deref(), full)
                .await
                .and_then(|r| json(&r))
        }
        (Method::POST, "/v1/apply") => match body::<ApplyRequest>(req).await {
            Ok(apply) => match engine.apply(apply).await {
                Ok(resp) => json(&resp),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        },
        (Method::POST, "/v1/rollout") => match body::<RolloutCommand>(req).await {
            Ok(cmd) => match parse_command(&cmd.command) {
                Ok(c) => engine
                    .command_by(
                        &cmd.service,
                        c,
                        cmd.actor.as_deref().unwrap_or("unknown (no actor given)"),
                    )
                    .await
                    .and_then(|()| json(&serde_json::json!({}))),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        },
        (Method::POST, "/v1/rollback") => match body::<RollbackRequest>(req).await {
            Ok(rb) => engine.rollback(rb).await.and_then(|r| json(&r)),
            Err(e) => Err(e),
        },
        (Method::POST, "/v1/shutdown") => match body::<ShutdownRequest>(req).await {
            Ok(shutdown) => {
                stop_instances.fetch_or(shutdown.stop_instances, Ordering::SeqCst);
                let _ = stop.send(true);
                json(&serde_json::json!({}))
            }
            Err(e) => Err(e),
        },
        _ => Err(Error::NotFound(format!("no such endpoint: {path}"))),
    };
    match result {
        Ok(resp) => resp,
        Err(e) => error_response(&e),
    }
}

fn parse_command(command: &str) -> Result<Command> {
    match command {
        "promote" => Ok(Command::Promote),
        "abort" => Ok(Command::Abort),
        "pause" => Ok(Command::Pause),
        "resume" => Ok(Command::Resume),
        other => Err(Error::NotFound(format!(
            "unknown rollout command `{other}`: expected promote, abort, pause or resume"
        ))),
    }
}

async fn body<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T> {
    let bytes = req
        .into_body()
        .collect()
        .await
        .map_err(|e| Error::Conflict(format!("reading the request: {e}")))?
        .to_bytes();
    Ok(serde_json::from_slice(&bytes)?)
}

fn json<T: serde::Serialize>(value: &T) -> Result<Response<Full<Bytes>>> {
    let bytes = serde_json::to_vec(value)?;
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .unwrap_or_default())
}

fn error_response(e: &Error) -> Response<Full<Bytes>> {
    let (status, kind) = match e {
        Error::State(kiln_state::Error::Locked(_)) => (StatusCode::LOCKED, "locked"),
        Error::PlanRefused(_) => (StatusCode::CONFLICT, "stale_plan"),
        Error::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
        Error::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    };
    let body = serde_json::to_vec(&ApiError {
        kind: kind.to_owned(),
        message: e.to_string(),
    })
    .unwrap_or_default();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}
