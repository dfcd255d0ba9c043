//! Finding and loading the project: the config file, variable overrides and the image store.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use kiln_bake::Store;
use kiln_core::Diagnostic;
use kiln_core::config::{self, Source};
use kiln_core::model::{Config, VarOverride, VarSource};

/// Options every command takes.
#[derive(Debug, clap::Args)]
pub struct GlobalArgs {
    /// The config file.
    #[arg(
        short = 'c',
        long,
        global = true,
        env = "KILN_CONFIG",
        default_value = "kiln.hcl"
    )]
    pub config: PathBuf,
    /// Set a variable: `-var name=value` (repeatable). Beats `KILN_VAR_name`.
    #[arg(long = "var", global = true, value_name = "NAME=VALUE")]
    pub vars: Vec<String>,
    /// The image store (default: `.kiln/store` beside the config).
    #[arg(long, global = true, env = "KILN_STORE")]
    pub store: Option<PathBuf>,
}

/// Accepts Terraform's single-dash spelling (`-var x=1`, `-var=x=1`, `-out plan`) as well.
pub fn terraform_style_args(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    args.map(|a| match a.to_str() {
        Some(s)
            if s == "-var" || s == "-out" || s.starts_with("-var=") || s.starts_with("-out=") =>
        {
            format!("-{s}").into()
        }
        _ => a,
    })
    .collect()
}

/// A loaded project.
#[derive(Debug)]
pub struct Project {
    /// The evaluated config.
    pub config: Config,
    /// The directory relative paths in the config resolve against.
    pub dir: PathBuf,
}

impl GlobalArgs {
    /// The variable overrides from `-var` flags and `KILN_VAR_*` variables.
    pub fn overrides(&self) -> Result<Vec<VarOverride>> {
        let mut out = Vec::new();
        for v in &self.vars {
            let Some((name, value)) = v.split_once('=') else {
                bail!("-var `{v}`: expected NAME=VALUE");
            };
            out.push(VarOverride {
                name: name.trim().to_owned(),
                value: value.to_owned(),
                source: VarSource::Flag,
            });
        }
        for (key, value) in std::env::vars_os() {
            let (Some(key), Some(value)) = (key.to_str(), value.to_str()) else {
                continue;
            };
            if let Some(name) = key.strip_prefix("KILN_VAR_") {
                out.push(VarOverride {
                    name: name.to_owned(),
                    value: value.to_owned(),
                    source: VarSource::Env,
                });
            }
        }
        Ok(out)
    }

    /// Reads and evaluates the config, returning it with every diagnostic (the config is
    /// `None` when there is an error).
    pub fn load_with_diagnostics(&self) -> Result<(Option<Project>, Vec<Diagnostic>)> {
        let text = std::fs::read_to_string(&self.config).with_context(|| {
            format!(
                "cannot read config `{}` (use -c FILE or run in a directory with a kiln.hcl)",
                self.config.display()
            )
        })?;
        let source = Source {
            name: self.config.display().to_string(),
            text,
        };
        let (config, diagnostics) = config::load(&source, &self.overrides()?);
        let project = config.map(|config| Project {
            config,
            dir: self.config_dir(),
        });
        Ok((project, diagnostics))
    }

    /// Reads and evaluates the config; any error diagnostic fails with all of them.
    pub fn load(&self) -> Result<Project> {
        let (project, diagnostics) = self.load_with_diagnostics()?;
        for d in diagnostics.iter().filter(|d| !d.is_error()) {
            eprintln!("{d}");
        }
        match project {
            Some(p) => Ok(p),
            None => {
                let errors: Vec<String> = diagnostics
                    .iter()
                    .filter(|d| d.is_error())
                    .map(ToString::to_string)
                    .collect();
                bail!(
                    "{}\n{} has {} error{}",
                    errors.join("\n"),
                    self.config.display(),
                    errors.len(),
                    if errors.len() == 1 { "" } else { "s" }
                )
            }
        }
    }

    fn config_dir(&self) -> PathBuf {
        match self.config.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        }
    }

    /// Where the image store is.
    pub fn store_path(&self) -> PathBuf {
        self.store
            .clone()
            .unwrap_or_else(|| self.config_dir().join(".kiln").join("store"))
    }

    /// Opens (creating if needed) the image store.
    pub fn open_store(&self) -> Result<Store> {
        let path = self.store_path();
        Store::open(&path)
            .with_context(|| format!("cannot open the image store at {}", path.display()))
    }
}

/// The commit of the git repository holding `dir`, and whether its tree has changes.
pub fn git_info(dir: &Path) -> Option<kiln_bake::GitInfo> {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let commit = run(&["rev-parse", "HEAD"])?;
    let dirty = run(&["status", "--porcelain"]).is_some_and(|s| !s.is_empty());
    Some(kiln_bake::GitInfo { commit, dirty })
}
