//! Staleness of locks held by other processes. These stand in for other holders through
//! `lock_as`, which the public API does not offer.

#![allow(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]

use std::process::{Child, Command};
use std::time::{Duration, UNIX_EPOCH};

use super::*;

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn request(operation: &str) -> LockRequest {
    LockRequest {
        operation: operation.to_owned(),
        who: "alice@build-1".to_owned(),
        info: String::new(),
        lease: Duration::from_secs(3600),
    }
}

fn store() -> (tempfile::TempDir, StateStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(&dir.path().join("state.db"), now()).unwrap();
    (dir, store)
}

/// A process that waits to be killed, and the holder identity it would have.
fn child() -> (Child, Holder) {
    let child = Command::new("sleep").arg("600").spawn().unwrap();
    let holder = Holder {
        host: Host::current(),
        pid: child.id(),
        pid_start: Some(proc_stat(child.id()).unwrap().start),
    };
    (child, holder)
}

fn assert_locked_by(result: Result<LockInfo>, id: &str) {
    match result {
        Err(Error::Locked(info)) => assert_eq!(info.id, id),
        other => panic!("expected the lock {id} to be kept, got {other:?}"),
    }
}

#[test]
fn parses_proc_stat_with_awkward_command_names() {
    let line = "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 \
                1000 200 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
    assert_eq!(
        parse_stat(line),
        Some(ProcStat {
            state: 'S',
            start: 987_654
        })
    );
    assert_eq!(parse_stat("4242 (truncated"), None);
    let own = proc_stat(std::process::id()).unwrap();
    assert_eq!(Holder::current().pid_start, Some(own.start));
}

#[test]
fn a_holder_that_exited_on_this_host_is_taken_over() {
    let (_dir, store) = store();
    let (mut child, holder) = child();
    let held = store.lock_as(&request("apply"), &holder, now()).unwrap();
    assert_eq!(held.pid, holder.pid);

    // While the holder runs, its lock stands.
    assert_locked_by(store.lock(&request("plan"), now()), &held.id);

    child.kill().unwrap();
    child.wait().unwrap();
    let taken = store.lock(&request("plan"), now()).unwrap();
    assert_ne!(taken.id, held.id);
    assert_eq!(taken.pid, std::process::id());
    assert_eq!(store.lock_info().unwrap(), Some(taken));
}

#[test]
fn a_zombie_holder_counts_as_gone() {
    let (_dir, store) = store();
    let (mut child, holder) = child();
    store.lock_as(&request("apply"), &holder, now()).unwrap();
    child.kill().unwrap();
    // Not yet reaped: /proc/<pid> still exists, in state Z, until `wait`. Polling the state
    // (rather than sleeping) waits for the kernel to finish the kill.
    while proc_stat(holder.pid).unwrap().state != 'Z' {
        std::thread::yield_now();
    }
    assert!(store.lock(&request("plan"), now()).is_ok());
    child.wait().unwrap();
}

#[test]
fn a_reused_pid_does_not_keep_a_dead_lock_alive() {
    let (_dir, store) = store();
    let mut holder = Holder::current();
    let start = holder.pid_start.unwrap();

    // The same pid and start time: the holder is this very process, alive.
    let held = store.lock_as(&request("apply"), &holder, now()).unwrap();
    assert_locked_by(store.lock(&request("plan"), now()), &held.id);
    store.unlock(&held.id).unwrap();

    // The same pid, started at another time: the holder died and its pid went to us.
    holder.pid_start = Some(start + 1);
    store.lock_as(&request("apply"), &holder, now()).unwrap();
    assert!(store.lock(&request("plan"), now()).is_ok());
}

#[test]
fn a_holder_elsewhere_is_trusted_until_its_lease_ends() {
    let (_dir, store) = store();
    let (mut child, mut holder) = child();
    child.kill().unwrap();
    child.wait().unwrap();

    // Another machine, or this one before a reboot: the pid means nothing here.
    let here = Host::current();
    for host in [
        Host {
            name: "build-2".to_owned(),
            boot_id: here.boot_id.clone(),
        },
        Host {
            name: here.name,
            boot_id: Some("00000000-0000-0000-0000-000000000000".to_owned()),
        },
    ] {
        holder.host = host;
        let held = store.lock_as(&request("apply"), &holder, now()).unwrap();
        assert_locked_by(store.lock(&request("plan"), now()), &held.id);
        let at_expiry = now() + Duration::from_secs(3600);
        assert_locked_by(store.lock(&request("plan"), at_expiry), &held.id);
        let after = at_expiry + Duration::from_millis(1);
        let taken = store.lock(&request("plan"), after).unwrap();
        store.unlock(&taken.id).unwrap();
    }
}
