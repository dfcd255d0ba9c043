//! What the driver reads from `/proc`: process state, parent, group, start time, pid
//! namespace; and for `observe`, a process's environment, command line and root directory.
//! A pid alone is not an identity (pids are reused), so every check pairs it with the start
//! time recorded when the instance started.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The fields of `/proc/<pid>/stat` the driver uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stat {
    /// Field 3: `R`, `S`, `Z` (zombie), ...
    pub state: char,
    /// Field 4.
    pub ppid: i32,
    /// Field 5: the process group.
    pub pgrp: i32,
    /// Field 22: start time in clock ticks since boot.
    pub start: u64,
}

impl Stat {
    /// Parses the text of `/proc/<pid>/stat`. The command name (field 2) may hold spaces and
    /// parentheses, so fields are counted from the last `)`.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let rest = &text[text.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // `fields[0]` is field 3.
        Some(Self {
            state: fields.first()?.chars().next()?,
            ppid: fields.get(1)?.parse().ok()?,
            pgrp: fields.get(2)?.parse().ok()?,
            start: fields.get(19)?.parse().ok()?,
        })
    }

    /// Whether the process still runs: not a zombie (exited, waiting to be reaped) nor dead.
    pub(crate) fn running(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// The stat of `pid`, if it exists.
pub(crate) fn stat(pid: i32) -> Option<Stat> {
    Stat::parse(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Whether the process `pid` that started at `start` still runs.
pub(crate) fn alive(pid: i32, start: u64) -> bool {
    stat(pid).is_some_and(|s| s.start == start && s.running())
}

/// The pid namespace of `pid`, as `pid:[4026532178]`.
pub(crate) fn pid_ns(pid: i32) -> Option<String> {
    let link = fs::read_link(format!("/proc/{pid}/ns/pid")).ok()?;
    Some(link.to_string_lossy().into_owned())
}

/// This process's effective uid (the second field of `Uid:` in `/proc/self/status`).
pub(crate) fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// The environment of `pid` as the kernel holds it (`/proc/<pid>/environ`): what the process
/// was executed with, not later `setenv`s. Needs the right to ptrace it (same user, or root).
pub(crate) fn environ(pid: i32) -> io::Result<BTreeMap<String, String>> {
    fs::read(format!("/proc/{pid}/environ")).map(|bytes| parse_environ(&bytes))
}

/// Parses NUL-separated `K=V` entries. Bytes that are not UTF-8 are replaced (`U+FFFD`); an
/// entry without `=` is a key with an empty value; of a key given twice the first wins, as
/// for `getenv`.
pub(crate) fn parse_environ(bytes: &[u8]) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for entry in bytes.split(|b| *b == 0).filter(|e| !e.is_empty()) {
        let entry = String::from_utf8_lossy(entry);
        let (key, value) = entry.split_once('=').unwrap_or((&entry, ""));
        env.entry(key.to_owned())
            .or_insert_with(|| value.to_owned());
    }
    env
}

/// The command line of `pid` now (`/proc/<pid>/cmdline`).
pub(crate) fn cmdline(pid: i32) -> io::Result<Vec<String>> {
    fs::read(format!("/proc/{pid}/cmdline")).map(|bytes| parse_cmdline(&bytes))
}

/// Parses NUL-terminated arguments; bytes that are not UTF-8 are replaced (`U+FFFD`). A
/// process that rewrote its command line as one string (`setproctitle`) has one argument.
pub(crate) fn parse_cmdline(bytes: &[u8]) -> Vec<String> {
    let bytes = bytes.strip_suffix(&[0]).unwrap_or(bytes);
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// `(st_dev, st_ino)` of the root directory of `pid`: `stat` follows the magic link
/// `/proc/<pid>/root` into the process's mount namespace, so a bind mount shows the identity
/// of the directory it binds.
pub(crate) fn root_id(pid: i32) -> io::Result<(u64, u64)> {
    file_id(Path::new(&format!("/proc/{pid}/root")))
}

/// `(st_dev, st_ino)` of `path`, following symlinks.
pub(crate) fn file_id(path: &Path) -> io::Result<(u64, u64)> {
    let md = fs::metadata(path)?;
    Ok((md.dev(), md.ino()))
}

/// Every pid on the host (of this pid namespace), in no particular order.
pub(crate) fn pids() -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Running processes whose stat satisfies `pred`.
pub(crate) fn find(pred: impl Fn(i32, &Stat) -> bool) -> Vec<(i32, Stat)> {
    pids()
        .into_iter()
        .filter_map(|pid| Some((pid, stat(pid)?)))
        .filter(|(pid, s)| s.running() && pred(*pid, s))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_with_spaces_and_parens() {
        let text = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 10 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
        let s = Stat::parse(text).expect("parses");
        assert_eq!(
            s,
            Stat {
                state: 'S',
                ppid: 1,
                pgrp: 4242,
                start: 987_654
            }
        );
        assert!(s.running());
        assert!(!Stat { state: 'Z', ..s }.running());
        assert!(Stat::parse("12 (x) S 1").is_none());
    }

    #[test]
    fn parses_environ() {
        let env = parse_environ(b"A=1\0B=x=y z\0EMPTY=\0NOVALUE\0A=2\0\0C=\xff\0");
        let want: BTreeMap<String, String> = [
            ("A", "1"),
            ("B", "x=y z"),
            ("EMPTY", ""),
            ("NOVALUE", ""),
            ("C", "\u{fffd}"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(env, want);
        assert!(parse_environ(b"").is_empty());
    }

    #[test]
    fn parses_cmdline() {
        assert_eq!(
            parse_cmdline(b"/bin/sh\0-c\0echo a  b\0\0"),
            ["/bin/sh", "-c", "echo a  b", ""]
        );
        assert_eq!(
            parse_cmdline(b"nginx: master process\0"),
            ["nginx: master process"]
        );
        assert_eq!(parse_cmdline(b"rewritten title"), ["rewritten title"]);
        assert!(parse_cmdline(b"").is_empty());
    }

    #[test]
    fn reads_this_process() {
        let me = i32::try_from(std::process::id()).expect("pid fits");
        let s = stat(me).expect("own stat");
        assert!(alive(me, s.start));
        assert!(
            !alive(me, s.start + 1),
            "another start time is another process"
        );
        assert!(pid_ns(me).is_some_and(|ns| ns.starts_with("pid:[")));
        assert!(pids().contains(&me));
        assert!(effective_uid().is_some());
        let env = environ(me).expect("own environ");
        // cargo runs tests with CARGO set (in the environment we were executed with).
        assert!(env.contains_key("CARGO"), "{:?}", env.keys());
        let args = cmdline(me).expect("own cmdline");
        assert_eq!(
            args.first().map(Path::new).and_then(Path::file_name),
            std::env::current_exe().expect("exe").file_name()
        );
        assert_eq!(
            root_id(me).expect("own root"),
            file_id(Path::new("/")).expect("/")
        );
        assert!(environ(i32::MAX).is_err());
    }
}
