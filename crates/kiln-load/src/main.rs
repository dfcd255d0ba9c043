//! `kiln-load URL [--concurrency N] [--duration D]`: load until the duration passes (or until
//! SIGINT/SIGTERM), then print a JSON summary on stdout. Exits 1 if any request failed.

use std::process::ExitCode;
use std::time::Duration;

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut url = None;
    let mut concurrency = 8;
    let mut duration = Duration::from_secs(10);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--concurrency" | "-c" => {
                concurrency = args.next().and_then(|v| v.parse().ok()).unwrap_or(8);
            }
            "--duration" | "-d" => {
                duration = args
                    .next()
                    .and_then(|v| v.trim_end_matches('s').parse().ok())
                    .map(Duration::from_secs)
                    .unwrap_or(duration);
            }
            _ => url = a.parse::<http::Uri>().ok(),
        }
    }
    let Some(url) = url else {
        eprintln!("usage: kiln-load URL [--concurrency N] [--duration SECONDS]");
        return ExitCode::FAILURE;
    };
    let stop = async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            () = tokio::time::sleep(duration) => {}
            _ = tokio::signal::ctrl_c() => {}
            Some(()) = async { match term.as_mut() { Some(t) => t.recv().await, None => std::future::pending().await } } => {}
        }
    };
    let summary = kiln_load::run(url, concurrency, stop).await;
    let json = serde_json::json!({
        "requests": summary.requests,
        "failed": summary.failed(),
        "statuses": summary.statuses,
        "releases": summary.releases,
        "p50_us": summary.quantile_us(0.5),
        "p99_us": summary.quantile_us(0.99),
        "failures": summary.failures,
    });
    #[allow(clippy::print_stdout)] // The summary is this tool's output.
    {
        println!("{json}");
    }
    if summary.failed() > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
