//! What the driver reads from `/proc`: process state, parent, group, start time, pid
//! namespace. A pid alone is not an identity (pids are reused), so every check pairs it with
//! the start time recorded when the instance started.

use std::fs;

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
    }
}
