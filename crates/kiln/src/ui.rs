//! Terminal output: errors, logs and progress. Progress goes to stderr so stdout stays for
//! results; on a terminal it is live, otherwise plain lines a log collector can keep.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use kiln_bake::{BakeEvent, ImageRecord};

/// Logs go to stderr, filtered by `KILN_LOG` (default: warnings).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
}

/// Prints an error with its whole chain of causes.
pub fn print_error(err: &anyhow::Error) {
    eprintln!("error: {err}");
    for cause in err.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
}

/// Prints a line of results on stdout.
#[allow(clippy::print_stdout)] // The CLI's results go to stdout by design.
pub fn out(line: impl std::fmt::Display) {
    println!("{line}");
}

/// Prints a value as pretty JSON on stdout.
pub fn out_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    out(serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Human sizes: 1.2 MB.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Shows a bake's progress: a spinner per step on a terminal, one line per event otherwise.
#[derive(Debug)]
pub struct BakeProgress {
    live: bool,
    quiet: bool,
    bar: Option<ProgressBar>,
    total: usize,
}

impl BakeProgress {
    /// `quiet` shows nothing (for `--json`, where stdout carries the result).
    pub fn new(quiet: bool) -> Self {
        Self {
            live: std::io::stderr().is_terminal(),
            quiet,
            bar: None,
            total: 0,
        }
    }

    /// Handles one event.
    pub fn event(&mut self, event: &BakeEvent<'_>) {
        if self.quiet {
            return;
        }
        match event {
            BakeEvent::ImageStarted { image, steps } => {
                self.total = *steps;
                if !self.live {
                    eprintln!("{image}: baking ({steps} step{})", plural(*steps));
                }
            }
            BakeEvent::StepStarted { image, index, name } => {
                if self.live {
                    let bar = ProgressBar::new_spinner().with_style(
                        ProgressStyle::with_template("{spinner} {prefix} {wide_msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    );
                    bar.set_prefix(format!("{image} [{index}/{}] {name}", self.total));
                    bar.enable_steady_tick(Duration::from_millis(100));
                    self.bar = Some(bar);
                }
            }
            BakeEvent::Output { image, line } => match &self.bar {
                Some(bar) => bar.set_message((*line).to_owned()),
                None => eprintln!("{image}  | {line}"),
            },
            BakeEvent::Progress { bytes, .. } => {
                if let Some(bar) = &self.bar {
                    bar.set_message(format!("{} written", size(*bytes)));
                }
            }
            BakeEvent::StepFinished { image, index, step } => {
                let how = if step.cached {
                    "cached".to_owned()
                } else {
                    format!(
                        "built in {} ms, {} file{}, {}",
                        step.duration_ms,
                        step.files,
                        plural(step.files as usize),
                        size(step.bytes)
                    )
                };
                let line = format!("{image} [{index}/{}] {}: {how}", self.total, step.name);
                // The spinner gives way to a plain line, so finished steps stay on screen.
                if let Some(bar) = self.bar.take() {
                    bar.finish_and_clear();
                }
                eprintln!("{line}");
            }
            BakeEvent::ImageFinished { record, unchanged } => {
                if let Some(bar) = self.bar.take() {
                    bar.finish_and_clear();
                }
                eprintln!("{}", summary(record, *unchanged));
            }
        }
    }

    /// Clears a half-drawn spinner after a failure.
    pub fn abandon(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.abandon_with_message("✗ failed");
        }
    }
}

fn summary(record: &ImageRecord, unchanged: bool) -> String {
    let cached = record.steps.iter().filter(|s| s.cached).count();
    format!(
        "{}: {} ({} step{}, {} cached{}, {})",
        record.name,
        record.digest,
        record.steps.len(),
        plural(record.steps.len()),
        cached,
        if unchanged { ", unchanged" } else { "" },
        size(record.size)
    )
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}
