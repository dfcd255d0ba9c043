//! Runs kiln's proxy alone for benchmarks (see `bench/proxy.sh`): one balancer on `--listen`
//! routing every request to one service whose single release pool holds the given upstreams.
//!
//! ```text
//! kiln-proxy-bench --listen 127.0.0.1:18080 127.0.0.1:18081 [UPSTREAM...]
//! ```
//!
//! It prints `ready` on stderr once every upstream passed its health check, and stops on
//! SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use kiln_proxy::{BackendSpec, Pool, Proxy, ProxyConfig, RouteTarget, ServiceTable};

fn usage() -> ExitCode {
    eprintln!("usage: kiln-proxy-bench --listen ADDR UPSTREAM_ADDR...");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut listen: Option<SocketAddr> = None;
    let mut upstreams: Vec<SocketAddr> = Vec::new();
    while let Some(arg) = args.next() {
        let parsed = if arg == "--listen" {
            args.next()
                .and_then(|a| a.parse().ok())
                .map(|a| listen = Some(a))
        } else {
            arg.parse().ok().map(|a| upstreams.push(a))
        };
        if parsed.is_none() {
            return usage();
        }
    }
    let Some(listen) = listen.filter(|_| !upstreams.is_empty()) else {
        return usage();
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(listen, upstreams)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    listen: SocketAddr,
    upstreams: Vec<SocketAddr>,
) -> Result<(), Box<dyn std::error::Error>> {
    let proxy = Proxy::new(ProxyConfig::default());
    let backends: Vec<BackendSpec> = upstreams
        .iter()
        .enumerate()
        .map(|(i, addr)| BackendSpec {
            id: format!("bench-{i}"),
            addr: *addr,
            routable: true,
        })
        .collect();
    let ids: Vec<String> = backends.iter().map(|b| b.id.clone()).collect();
    proxy.set_service(
        "bench",
        ServiceTable {
            pools: vec![Pool {
                release: 1,
                weight: 100,
                backends,
                health: None,
            }],
            health: None,
            preview: None,
        },
    );
    proxy.set_routes(
        "bench",
        vec![RouteTarget {
            host: None,
            path_prefix: "/".into(),
            service: "bench".into(),
        }],
    );
    let addr = proxy.bind("bench", listen).await?;
    // Bounded: an upstream that is not up within 10 s is a broken benchmark set-up.
    for _ in 0..1000 {
        if ids
            .iter()
            .all(|id| proxy.backend_health(id).is_some_and(|h| h.healthy))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Some(id) = ids
        .iter()
        .find(|id| !proxy.backend_health(id).is_some_and(|h| h.healthy))
    {
        return Err(format!(
            "upstream {id} is not healthy: {:?}",
            proxy.backend_health(id)
        )
        .into());
    }
    eprintln!("ready: listening on {addr}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    proxy.unbind("bench").await;
    Ok(())
}
