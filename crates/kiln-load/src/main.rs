//! `kiln-load URL [--concurrency N] [--duration D]`: load until the duration passes (or until
//! SIGINT/SIGTERM), then print a JSON summary on stdout. Exits 1 if any request failed.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// Sends requests to URL from N clients, each waiting for its answer before the next, and
/// prints what came back: statuses, the releases that served (`X-Kiln-Release`), latencies.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// An `http://` URL.
    url: http::Uri,
    /// Clients sending at once.
    #[arg(short, long, default_value_t = 8)]
    concurrency: usize,
    /// How long to send (`10s`, `5m`; a bare number is seconds); SIGINT or SIGTERM end it early.
    #[arg(short, long, default_value = "10s", value_parser = duration)]
    duration: Duration,
}

fn duration(s: &str) -> Result<Duration, String> {
    match s.parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(s).map_err(|e| e.to_string()),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let duration = args.duration;
    let stop = async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            () = tokio::time::sleep(duration) => {}
            _ = tokio::signal::ctrl_c() => {}
            Some(()) = async { match term.as_mut() { Some(t) => t.recv().await, None => std::future::pending().await } } => {}
        }
    };
    let summary = kiln_load::run(args.url, args.concurrency, stop).await;
    let json = serde_json::json!({
        "requests": summary.requests,
        "failed": summary.failed(),
        "statuses": summary.statuses,
        "releases": summary.releases,
        "failed_by_release": summary.failed_by_release,
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
