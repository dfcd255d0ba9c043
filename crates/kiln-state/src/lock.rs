//! The state lock: one row in the database, with a lease, and a holder identity precise enough
//! to tell when the holding process on this host is gone.

use std::time::{Duration, SystemTime};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::time::{add, rfc3339, unix_millis};
use crate::{Error, Result, StateStore};

/// What a caller asks for when it takes the lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockRequest {
    /// The command holding it, e.g. `apply`.
    pub operation: String,
    /// The person, `user@host`.
    pub who: String,
    /// Free text shown to whoever finds the state locked.
    pub info: String,
    /// How long the lock lasts unless renewed. After that anyone may take it over.
    pub lease: Duration,
}

/// A held lock, as shown by `kiln state lock-info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    /// The lock's uuid; `force-unlock` must name it.
    pub id: String,
    /// The command holding it.
    pub operation: String,
    /// The person, `user@host`.
    pub who: String,
    /// Free text from the holder.
    pub info: String,
    /// The host name of the machine the holder runs on.
    pub host: String,
    /// The holder's process id on that host.
    pub pid: u32,
    /// When it was taken (RFC 3339).
    pub created: String,
    /// When its lease runs out (RFC 3339).
    pub expires: String,
}

/// The process holding a lock: where it runs and which process it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Holder {
    pub(crate) host: Host,
    pub(crate) pid: u32,
    /// Field 22 of `/proc/<pid>/stat` (start time in clock ticks after boot). A pid is reused
    /// once its process is gone; the start time is not, on the same boot.
    pub(crate) pid_start: Option<u64>,
}

/// A machine, on one boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Host {
    pub(crate) name: String,
    /// `/proc/sys/kernel/random/boot_id`: a new uuid on every boot.
    pub(crate) boot_id: Option<String>,
}

impl Host {
    pub(crate) fn current() -> Self {
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        };
        Self {
            name: read("/proc/sys/kernel/hostname").unwrap_or_else(|| "unknown".to_owned()),
            boot_id: read("/proc/sys/kernel/random/boot_id"),
        }
    }

    /// Whether a lock taken on `other` was taken on this machine since it last booted, so that
    /// its pid can be looked up here. Without a boot id we cannot tell, and say no.
    fn same_boot(&self, other: &Host) -> bool {
        self.boot_id.is_some() && self.boot_id == other.boot_id && self.name == other.name
    }
}

impl Holder {
    /// This process.
    pub(crate) fn current() -> Self {
        let pid = std::process::id();
        Self {
            host: Host::current(),
            pid,
            pid_start: proc_stat(pid).ok().map(|stat| stat.start),
        }
    }
}

/// The lock row: what people see plus what staleness is judged on.
struct Stored {
    info: LockInfo,
    holder: Holder,
    expires_ms: i64,
}

impl Stored {
    /// Why the lock may be taken over, or `None` while its holder may still be working.
    fn stale(&self, now: SystemTime, here: &Host) -> Option<&'static str> {
        if self.expires_ms < unix_millis(now) {
            Some("its lease expired")
        } else if here.same_boot(&self.holder.host)
            && !process_alive(self.holder.pid, self.holder.pid_start)
        {
            Some("its process is gone")
        } else {
            None
        }
    }
}

impl StateStore {
    /// Takes the state lock for this process.
    ///
    /// Succeeds when nobody holds it, or when the lock held is stale: its lease ran out before
    /// `now`, or it was taken on this host, since its last boot, by a process that is gone.
    /// Otherwise fails with [`Error::Locked`], which says who holds it and how to remove it.
    pub fn lock(&self, req: &LockRequest, now: SystemTime) -> Result<LockInfo> {
        self.lock_as(req, &Holder::current(), now)
    }

    /// [`StateStore::lock`] on behalf of `holder`: lets tests stand in for other processes.
    pub(crate) fn lock_as(
        &self,
        req: &LockRequest,
        holder: &Holder,
        now: SystemTime,
    ) -> Result<LockInfo> {
        let tx = self.immediate()?;
        if let Some(current) = load(&tx)? {
            let Some(reason) = current.stale(now, &Host::current()) else {
                return Err(Error::Locked(Box::new(current.info)));
            };
            tracing::warn!(
                lock_id = current.info.id,
                operation = current.info.operation,
                who = current.info.who,
                host = current.info.host,
                pid = current.info.pid,
                since = current.info.created,
                "taking over the state lock: {reason}"
            );
            tx.execute("DELETE FROM lock", [])?;
        }
        let expires = add(now, req.lease);
        let info = LockInfo {
            id: uuid::Uuid::new_v4().to_string(),
            operation: req.operation.clone(),
            who: req.who.clone(),
            info: req.info.clone(),
            host: holder.host.name.clone(),
            pid: holder.pid,
            created: rfc3339(now),
            expires: rfc3339(expires),
        };
        tx.execute(
            "INSERT INTO lock (slot, id, operation, who, info, host, boot_id, pid, pid_start,
                               created, expires, expires_ms)
             VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                info.id,
                info.operation,
                info.who,
                info.info,
                info.host,
                holder.host.boot_id,
                info.pid,
                holder.pid_start,
                info.created,
                info.expires,
                unix_millis(expires),
            ],
        )?;
        tx.commit()?;
        Ok(info)
    }

    /// Extends the lock `lock_id` to `now + lease`. Fails with [`Error::LockLost`] when that
    /// lock was removed or taken over: the caller must stop, it no longer owns the state.
    pub fn renew(&self, lock_id: &str, lease: Duration, now: SystemTime) -> Result<()> {
        let tx = self.immediate()?;
        held_by(&tx, lock_id)?;
        let expires = add(now, lease);
        tx.execute(
            "UPDATE lock SET expires = ?1, expires_ms = ?2",
            params![rfc3339(expires), unix_millis(expires)],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Releases the lock `lock_id`. Fails with [`Error::LockLost`] unless `lock_id` holds it.
    pub fn unlock(&self, lock_id: &str) -> Result<()> {
        let tx = self.immediate()?;
        held_by(&tx, lock_id)?;
        tx.execute("DELETE FROM lock", [])?;
        tx.commit()?;
        Ok(())
    }

    /// The lock held now, stale or not.
    pub fn lock_info(&self) -> Result<Option<LockInfo>> {
        Ok(load(&self.conn)?.map(|stored| stored.info))
    }

    /// Removes the lock whatever its holder, provided `lock_id` names it exactly: that proves
    /// the caller looked at the lock it removes. Returns what was removed.
    pub fn force_unlock(&self, lock_id: &str) -> Result<LockInfo> {
        let tx = self.immediate()?;
        let Some(current) = load(&tx)? else {
            return Err(Error::NotLocked {
                given: lock_id.to_owned(),
            });
        };
        if current.info.id != lock_id {
            return Err(Error::LockIdMismatch {
                given: lock_id.to_owned(),
                current: current.info.id,
            });
        }
        tx.execute("DELETE FROM lock", [])?;
        tx.commit()?;
        tracing::warn!(
            lock_id,
            operation = current.info.operation,
            who = current.info.who,
            "state lock forcibly removed"
        );
        Ok(current.info)
    }
}

fn load(conn: &Connection) -> Result<Option<Stored>> {
    let stored = conn
        .prepare_cached(
            "SELECT id, operation, who, info, host, pid, created, expires,
                    boot_id, pid_start, expires_ms
             FROM lock",
        )?
        .query_row([], |row| {
            let info = LockInfo {
                id: row.get(0)?,
                operation: row.get(1)?,
                who: row.get(2)?,
                info: row.get(3)?,
                host: row.get(4)?,
                pid: row.get(5)?,
                created: row.get(6)?,
                expires: row.get(7)?,
            };
            let holder = Holder {
                host: Host {
                    name: info.host.clone(),
                    boot_id: row.get(8)?,
                },
                pid: info.pid,
                pid_start: row.get(9)?,
            };
            Ok(Stored {
                info,
                holder,
                expires_ms: row.get(10)?,
            })
        })
        .optional()?;
    Ok(stored)
}

/// Checks that `lock_id` holds the lock.
fn held_by(conn: &Connection, lock_id: &str) -> Result<()> {
    let current = load(conn)?.map(|stored| stored.info.id);
    if current.as_deref() == Some(lock_id) {
        Ok(())
    } else {
        Err(Error::LockLost {
            lock_id: lock_id.to_owned(),
            current,
        })
    }
}

/// The fields of `/proc/<pid>/stat` that staleness needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// Field 3: `R`, `S`, `Z` (zombie), …
    pub(crate) state: char,
    /// Field 22: start time in clock ticks after boot.
    pub(crate) start: u64,
}

pub(crate) fn proc_stat(pid: u32) -> std::io::Result<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unexpected /proc/{pid}/stat: {text}"),
        )
    })
}

/// Parses `pid (comm) state ppid … starttime …`. `comm` may hold spaces and parentheses, so
/// fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // `state` is field 3; field 22 is 19 further on.
    let start = fields.nth(18)?.parse().ok()?;
    Some(ProcStat { state, start })
}

/// Whether process `pid` on this host still runs and, when `start` is known, is the same
/// process that took the lock. When in doubt, alive: a lease still ends a wrong guess.
fn process_alive(pid: u32, start: Option<u64>) -> bool {
    use nix::errno::Errno;
    use nix::sys::signal::kill;
    use nix::unistd::Pid;

    // 0 and negative pids name process groups for kill(2); no holder has them.
    let Some(raw) = i32::try_from(pid).ok().filter(|&p| p > 0) else {
        return false;
    };
    // Signal 0 checks existence, and sees processes of other users that /proc may hide.
    if kill(Pid::from_raw(raw), None) == Err(Errno::ESRCH) {
        return false;
    }
    match proc_stat(pid) {
        // A zombie has exited; only its exit status waits to be collected.
        Ok(stat) => !matches!(stat.state, 'Z' | 'X') && start.is_none_or(|s| s == stat.start),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests;
