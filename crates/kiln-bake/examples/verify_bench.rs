//! Times drift verification of a tree.
//!
//! ```text
//! cargo run --release -p kiln-bake --example verify_bench -- DIR [SCRATCH]
//! ```
//!
//! Bakes `DIR` into a one-layer image (`base = "dir:DIR"`) in a temporary store under `SCRATCH`
//! (default: the system temp directory), builds the image's file manifest, unpacks the image
//! with `apply_layers` as an instance root would be, and times, 5 runs each (medians):
//!
//! - (a) `verify_tree(full = true)` with a new, empty stat cache each run;
//! - (b) `verify_tree(full = true)` again with the cache of a clean pass (full ignores it);
//! - (c) `verify_tree(full = false)` after a clean pass: only stat calls, no file is read.
//!
//! The page cache is warm for all of them (the tree was just written). Exits non-zero if any
//! verification reports a change. The last line, `verify_bench: key=value …`, is for scripts.
#![allow(clippy::print_stdout, reason = "a benchmark's figures are its output")]
#![allow(
    clippy::disallowed_methods,
    reason = "a benchmark measures wall time with Instant::now"
)]

use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_bake::{BakeSettings, Report, StatCache, Store, apply_layers, verify_tree};
use kiln_core::clock::SystemClock;
use kiln_core::config::{Source, load};

const RUNS: usize = 5;

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args_os().skip(1);
    let Some(dir) = args.next().map(PathBuf::from) else {
        return Err("usage: verify_bench DIR [SCRATCH]".into());
    };
    let dir = dir.canonicalize()?;
    let scratch = args.next().map_or_else(std::env::temp_dir, PathBuf::from);
    let work = tempfile::Builder::new()
        .prefix("verify-bench-")
        .tempdir_in(&scratch)?;
    let store = Store::open(&work.path().join("store"))?;

    let started = Instant::now();
    let record = bake_dir(&store, &dir)?;
    println!(
        "bake of {}: {} ms (image {})",
        dir.display(),
        started.elapsed().as_millis(),
        record.digest.short()
    );

    let started = Instant::now();
    let manifest = store.manifest(&record)?;
    println!(
        "manifest: {} entries, built in {} ms",
        manifest.entries.len(),
        started.elapsed().as_millis()
    );
    let started = Instant::now();
    let cached = store.manifest(&record)?;
    assert_eq!(cached, manifest);
    println!(
        "manifest from the store's cache: {} ms",
        started.elapsed().as_millis()
    );

    let root = work.path().join("root");
    std::fs::create_dir(&root)?;
    let started = Instant::now();
    apply_layers(&store, &record.layers, &root)?;
    println!(
        "apply_layers into the instance root: {} ms",
        started.elapsed().as_millis()
    );
    // Write the fresh tree back now, so that the kernel's writeback does not compete with the
    // runs below; and let it age past the racy-clean margin (files changed less than a second
    // before a scan are not cached), so that (c) measures the steady state.
    rustix::fs::sync();
    std::thread::sleep(Duration::from_millis(1100));

    let threads = rayon::current_num_threads();
    println!("hashing threads: {threads}");

    let (full, report) = timed(|| verify_tree(&root, &manifest, &mut StatCache::default(), true))?;
    print_line("(a) full, no stat cache", &full, &report);

    let mut cache = StatCache::default();
    verify_tree(&root, &manifest, &mut cache, true)?;
    let (second, report2) = timed(|| verify_tree(&root, &manifest, &mut cache, true))?;
    print_line("(b) full, second pass", &second, &report2);

    let mut cache = StatCache::default();
    verify_tree(&root, &manifest, &mut cache, false)?;
    let (quick, report3) = timed(|| verify_tree(&root, &manifest, &mut cache, false))?;
    print_line("(c) stat-prefiltered", &quick, &report3);

    let changes = report.changes.len() + report2.changes.len() + report3.changes.len();
    println!(
        "verify_bench: full_ms={:.1} second_ms={:.1} quick_ms={:.1} files={} bytes={} entries={} quick_hashed={} changes={}",
        ms(full.median()),
        ms(second.median()),
        ms(quick.median()),
        report.files_hashed,
        report.bytes_hashed,
        report.entries,
        report3.files_hashed,
        changes
    );
    if changes != 0 {
        for c in report.changes.iter().take(20) {
            println!("  {c}");
        }
        return Err(format!("{changes} changes reported on an untouched tree").into());
    }
    Ok(())
}

/// Bakes `dir` as the only layer of an image named `tree`.
fn bake_dir(store: &Store, dir: &Path) -> Result<kiln_bake::ImageRecord, Box<dyn Error>> {
    let source = Source {
        name: "bench.hcl".into(),
        text: format!(
            "project = \"bench\"\nimage \"tree\" {{ base = \"dir:{}\" }}\n",
            dir.display()
        ),
    };
    let (config, diags) = load(&source, &[]);
    let config = config.ok_or_else(|| format!("{diags:?}"))?;
    let settings = BakeSettings {
        context_dir: dir.to_path_buf(),
        epoch: 0,
        git: None,
        kiln_version: "verify_bench".into(),
        host: "bench".into(),
        bwrap: None,
    };
    let records = kiln_bake::bake(store, &config, &[], &settings, &SystemClock, &mut |_| {})?;
    records
        .into_iter()
        .last()
        .ok_or_else(|| "nothing baked".into())
}

/// Wall times of `RUNS` runs, sorted.
struct Times(Vec<Duration>);

impl Times {
    fn median(&self) -> Duration {
        self.0[self.0.len() / 2]
    }
}

/// Runs `f` `RUNS` times; returns the times and the last report.
fn timed(
    mut f: impl FnMut() -> kiln_bake::Result<Report>,
) -> Result<(Times, Report), Box<dyn Error>> {
    let mut times = Vec::with_capacity(RUNS);
    let mut last = None;
    for _ in 0..RUNS {
        let started = Instant::now();
        let report = f()?;
        times.push(started.elapsed());
        last = Some(report);
    }
    times.sort();
    let report = last.ok_or("no run")?;
    Ok((Times(times), report))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn print_line(label: &str, times: &Times, r: &Report) {
    let median = times.median();
    let mb_s = r.bytes_hashed as f64 / 1e6 / median.as_secs_f64();
    println!(
        "{label:<26} median {:7.1} ms (min {:.1}, max {:.1})  {:6.0} MB/s  hashed {} files ({} bytes), skipped {}, {} entries, {} changes",
        ms(median),
        ms(times.0[0]),
        ms(times.0[times.0.len() - 1]),
        mb_s,
        r.files_hashed,
        r.bytes_hashed,
        r.files_skipped,
        r.entries,
        r.changes.len()
    );
}
