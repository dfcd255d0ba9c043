//! The state store against real SQLite files in temporary directories. Time moves by hand.

#![allow(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use expect_test::expect;
use kiln_core::Digest;
use kiln_state::{Error, LockRequest, NewEvent, StateStore, WriteMeta};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// 2026-11-29T12:00:00Z.
fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_795_953_600)
}

fn at(secs: u64) -> SystemTime {
    t0() + Duration::from_secs(secs)
}

fn temp() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = kiln_state::default_path(dir.path());
    (dir, path)
}

fn open(path: &Path) -> StateStore {
    StateStore::open(path, t0()).unwrap()
}

fn meta(actor: &str, operation: &str) -> WriteMeta {
    WriteMeta {
        actor: actor.to_owned(),
        operation: operation.to_owned(),
    }
}

fn event(kind: &str, message: &str) -> NewEvent {
    NewEvent {
        service: Some("web".to_owned()),
        kind: kind.to_owned(),
        message: message.to_owned(),
        data: json!({ "kind": kind }),
    }
}

fn lock_request(operation: &str, lease_secs: u64) -> LockRequest {
    LockRequest {
        operation: operation.to_owned(),
        who: "alice@build-1".to_owned(),
        info: "rolling out web v2".to_owned(),
        lease: Duration::from_secs(lease_secs),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Doc {
    services: Vec<String>,
    stable: Option<u32>,
}

#[test]
fn open_creates_a_private_file_with_a_lineage_and_serial_zero() {
    let (_dir, path) = temp();
    let store = open(&path);
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let lineage = store.lineage().unwrap();
    assert_eq!(
        uuid::Uuid::parse_str(&lineage).unwrap().get_version_num(),
        4
    );
    let state = store.read::<Value>().unwrap();
    assert_eq!(state.lineage, lineage);
    assert_eq!(state.serial, 0);
    assert_eq!(state.doc, json!({}));
    assert_eq!(state.written_at, "2026-11-29T12:00:00Z");
    assert_eq!(state.hash, Digest::of(b"{}").to_string());
    store.verify().unwrap();

    fn send<T: Send>() {}
    send::<StateStore>();
}

#[test]
fn reopening_keeps_the_lineage_and_the_state() {
    let (_dir, path) = temp();
    let lineage = {
        let store = open(&path);
        store
            .write(0, &json!({ "a": 1 }), &meta("alice", "apply"), &[], at(1))
            .unwrap();
        store.lineage().unwrap()
    };
    let store = StateStore::open(&path, at(100)).unwrap();
    assert_eq!(store.lineage().unwrap(), lineage);
    let state = store.read::<Value>().unwrap();
    assert_eq!((state.serial, state.doc), (1, json!({ "a": 1 })));

    // Another file is another history.
    let (_other_dir, other) = temp();
    assert_ne!(open(&other).lineage().unwrap(), lineage);
}

#[test]
fn writes_round_trip_and_increment_the_serial() {
    let (_dir, path) = temp();
    let store = open(&path);
    let mut doc = Doc {
        services: vec!["web".to_owned()],
        stable: None,
    };
    assert_eq!(
        store
            .write(0, &doc, &meta("alice", "apply"), &[], at(1))
            .unwrap(),
        1
    );
    doc.stable = Some(1);
    assert_eq!(
        store
            .write(1, &doc, &meta("alice", "apply"), &[], at(2))
            .unwrap(),
        2
    );

    let state = store.read::<Doc>().unwrap();
    assert_eq!(state.serial, 2);
    assert_eq!(state.doc, doc);
    assert_eq!(state.written_at, "2026-11-29T12:00:02Z");
    assert_eq!(
        state.hash,
        Digest::of(serde_json::to_string(&doc).unwrap().as_bytes()).to_string()
    );

    // Asking for the wrong shape is a decode error that names the version.
    let err = store.read::<Vec<u32>>().unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cannot decode state version 2: "),
        "{err}"
    );
}

#[test]
fn a_stale_write_conflicts_and_changes_nothing() {
    let (_dir, path) = temp();
    let store = open(&path);
    store
        .write(
            0,
            &json!({ "v": "first" }),
            &meta("alice", "apply"),
            &[],
            at(1),
        )
        .unwrap();

    let err = store
        .write(
            0,
            &json!({ "v": "second" }),
            &meta("bob", "apply"),
            &[event("release.created", "web v2")],
            at(2),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Conflict {
                expected: 0,
                found: 1
            }
        ),
        "{err:?}"
    );
    expect![[
        r#"state changed since it was read: expected serial 0, found 1; read it again and retry"#
    ]]
    .assert_eq(&err.to_string());

    let state = store.read::<Value>().unwrap();
    assert_eq!((state.serial, state.doc), (1, json!({ "v": "first" })));
    assert_eq!(store.versions().unwrap().len(), 2);
    assert!(
        store.events(0, 100).unwrap().is_empty(),
        "a failed write logs nothing"
    );

    // A writer from the future is refused too.
    assert!(matches!(
        store.write(7, &json!({}), &meta("bob", "apply"), &[], at(3)),
        Err(Error::Conflict {
            expected: 7,
            found: 1
        })
    ));
}

#[test]
fn every_version_is_kept_and_listed() {
    let (_dir, path) = temp();
    let store = open(&path);
    for (i, (actor, operation)) in [("alice", "apply"), ("kiln server", "drift --remediate")]
        .into_iter()
        .enumerate()
    {
        let serial = i as u64;
        store
            .write(
                serial,
                &json!({ "n": serial + 1 }),
                &meta(actor, operation),
                &[],
                at(60 * (serial + 1)),
            )
            .unwrap();
    }

    for serial in 0..=2 {
        let version = store.read_version::<Value>(serial).unwrap();
        assert_eq!(version.serial, serial);
        let expected = if serial == 0 {
            json!({})
        } else {
            json!({ "n": serial })
        };
        assert_eq!(version.doc, expected);
    }
    let missing = store.read_version::<Value>(9).unwrap_err();
    assert!(matches!(
        missing,
        Error::NoSuchVersion {
            serial: 9,
            newest: 2
        }
    ));
    expect!["no state version 9: the newest is 2"].assert_eq(&missing.to_string());

    let listing: String = store
        .versions()
        .unwrap()
        .iter()
        .map(|v| {
            format!(
                "{} {} {:<12} {:<18} {}B {}\n",
                v.serial,
                v.written_at,
                v.actor,
                v.operation,
                v.size,
                &v.hash[..19]
            )
        })
        .collect();
    expect![[r#"
        0 2026-11-29T12:00:00Z kiln         init               2B sha256:44136fa355b3
        1 2026-11-29T12:01:00Z alice        apply              7B sha256:2bfd14f43d17
        2 2026-11-29T12:02:00Z kiln server  drift --remediate  7B sha256:363379742f80
    "#]]
    .assert_eq(&listing);
}

#[test]
fn verify_catches_a_version_edited_or_deleted_outside_kiln() {
    let (_dir, path) = temp();
    let store = open(&path);
    for serial in 0..3 {
        store
            .write(
                serial,
                &json!({ "replicas": 3 }),
                &meta("alice", "apply"),
                &[],
                at(serial),
            )
            .unwrap();
    }
    store.verify().unwrap();

    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute(
        r#"UPDATE versions SET doc = '{"replicas":30}' WHERE serial = 2"#,
        [],
    )
    .unwrap();
    let err = store.verify().unwrap_err();
    assert!(matches!(err, Error::Tampered { serial: 2, .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("state version 2 was changed outside kiln: its json hashes to sha256:"),
        "{err}"
    );
    // Reads show the bytes as they are now, with their own hash.
    let edited = store.read_version::<Value>(2).unwrap();
    assert_eq!(edited.doc, json!({ "replicas": 30 }));
    assert_ne!(edited.hash, store.versions().unwrap()[2].hash);

    raw.execute(
        r#"UPDATE versions SET doc = '{"replicas":3}' WHERE serial = 2"#,
        [],
    )
    .unwrap();
    store.verify().unwrap();
    raw.execute("DELETE FROM versions WHERE serial = 1", [])
        .unwrap();
    expect!["state version 1 was changed outside kiln: the version is missing"]
        .assert_eq(&store.verify().unwrap_err().to_string());
}

#[test]
fn racing_writers_on_separate_connections_never_both_win() {
    let (_dir, path) = temp();
    drop(open(&path));
    let barrier = Arc::new(Barrier::new(2));
    let racers: Vec<_> = (0..2)
        .map(|n| {
            let (path, barrier) = (path.clone(), Arc::clone(&barrier));
            std::thread::spawn(move || {
                let store = open(&path);
                let mut outcomes = Vec::new();
                for round in 0..20 {
                    barrier.wait();
                    let expected = round;
                    let doc = json!({ "round": round, "writer": n });
                    let result = store.write(
                        expected,
                        &doc,
                        &meta(&format!("writer-{n}"), "apply"),
                        &[event("write", &format!("writer {n} round {round}"))],
                        at(round),
                    );
                    outcomes.push(result.map_err(|e| match e {
                        Error::Conflict { expected, found } => (expected, found),
                        other => panic!("unexpected error: {other}"),
                    }));
                    // Both read the outcome of the round before the next one starts.
                    barrier.wait();
                }
                outcomes
            })
        })
        .collect();
    let outcomes: Vec<_> = racers.into_iter().map(|r| r.join().unwrap()).collect();

    for round in 0..20u64 {
        let pair = [&outcomes[0][round as usize], &outcomes[1][round as usize]];
        let wins: Vec<_> = pair.iter().filter_map(|o| o.as_ref().ok()).collect();
        let losses: Vec<_> = pair.iter().filter_map(|o| o.as_ref().err()).collect();
        assert_eq!(wins, [&(round + 1)], "round {round}: {pair:?}");
        assert_eq!(losses, [&(round, round + 1)], "round {round}: {pair:?}");
    }
    let store = open(&path);
    assert_eq!(store.read::<Value>().unwrap().serial, 20);
    assert_eq!(store.events(0, 100).unwrap().len(), 20, "only winners log");
    store.verify().unwrap();
}

#[test]
fn events_are_logged_with_writes_and_paged_by_id() {
    let (_dir, path) = temp();
    let store = open(&path);
    store
        .write(
            0,
            &json!({}),
            &meta("alice", "apply"),
            &[
                event("release.created", "web v1"),
                event("rollout.started", "web → v1"),
            ],
            at(1),
        )
        .unwrap();
    store
        .append_events(
            &[NewEvent {
                service: None,
                kind: "server.started".to_owned(),
                message: "kiln server started".to_owned(),
                data: Value::Null,
            }],
            at(2),
        )
        .unwrap();
    // A lost race logs nothing.
    assert!(
        store
            .write(
                0,
                &json!({}),
                &meta("bob", "apply"),
                &[event("lost", "never")],
                at(3)
            )
            .is_err()
    );
    store
        .append_events(&[event("rollout.step", "web 10%")], at(4))
        .unwrap();

    let all = store.events(0, 100).unwrap();
    let lines: String = all
        .iter()
        .map(|e| {
            format!(
                "{} {} {:?} {} {:?} {}\n",
                e.id, e.time, e.service, e.kind, e.message, e.data
            )
        })
        .collect();
    expect![[r#"
        1 2026-11-29T12:00:01Z Some("web") release.created "web v1" {"kind":"release.created"}
        2 2026-11-29T12:00:01Z Some("web") rollout.started "web → v1" {"kind":"rollout.started"}
        3 2026-11-29T12:00:02Z None server.started "kiln server started" null
        4 2026-11-29T12:00:04Z Some("web") rollout.step "web 10%" {"kind":"rollout.step"}
    "#]]
    .assert_eq(&lines);

    let page = |after, limit| -> Vec<u64> {
        store
            .events(after, limit)
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect()
    };
    assert_eq!(page(0, 2), [1, 2]);
    assert_eq!(page(2, 2), [3, 4]);
    assert_eq!(page(4, 2), [] as [u64; 0]);
    assert_eq!(page(1, 0), [] as [u64; 0]);
}

/// Replaces the lock id and this process's pid, which differ on every run.
fn redact(message: &str, id: &str) -> String {
    message
        .replace(id, "<lock-id>")
        .replace(&format!("pid {}", std::process::id()), "pid <pid>")
}

#[test]
fn a_held_lock_refuses_others_and_says_how_to_remove_it() {
    let (_dir, path) = temp();
    let first = open(&path);
    let second = open(&path);
    let held = first.lock(&lock_request("apply", 60), t0()).unwrap();
    assert_eq!(held.who, "alice@build-1");
    assert_eq!(held.pid, std::process::id());
    assert_eq!(held.created, "2026-11-29T12:00:00Z");
    assert_eq!(held.expires, "2026-11-29T12:01:00Z");
    assert_eq!(second.lock_info().unwrap().as_ref(), Some(&held));

    let err = second.lock(&lock_request("plan", 60), at(30)).unwrap_err();
    let Error::Locked(info) = &err else {
        panic!("expected Locked, got {err:?}")
    };
    assert_eq!(**info, held);
    expect!["state is locked by apply (alice@build-1, pid <pid>) since 2026-11-29T12:00:00Z, lock id <lock-id>; if that process is gone, run kiln state force-unlock <lock-id>"]
        .assert_eq(&redact(&err.to_string(), &held.id));

    first.unlock(&held.id).unwrap();
    assert_eq!(second.lock_info().unwrap(), None);
    second.lock(&lock_request("plan", 60), at(31)).unwrap();
}

#[test]
fn an_expired_lock_is_taken_over_and_its_holder_loses_it() {
    let (_dir, path) = temp();
    let store = open(&path);
    let old = store.lock(&lock_request("apply", 60), t0()).unwrap();

    // Up to and including the moment it expires, the lease holds.
    assert!(matches!(
        store.lock(&lock_request("plan", 60), at(60)),
        Err(Error::Locked(_))
    ));
    let new = store.lock(&lock_request("plan", 60), at(61)).unwrap();
    assert_ne!(new.id, old.id);
    assert_eq!(new.created, "2026-11-29T12:01:01Z");

    // The old holder finds out as soon as it renews or unlocks, and cannot remove the new lock.
    let lost = store
        .renew(&old.id, Duration::from_secs(60), at(62))
        .unwrap_err();
    assert!(matches!(&lost, Error::LockLost { current: Some(c), .. } if *c == new.id));
    assert_eq!(
        redact(&lost.to_string(), &old.id).replace(&new.id, "<new-id>"),
        "state lock <lock-id> is no longer held: lock <new-id> holds the state now"
    );
    assert!(matches!(store.unlock(&old.id), Err(Error::LockLost { .. })));
    assert_eq!(store.lock_info().unwrap(), Some(new));
}

#[test]
fn renewing_extends_the_lease() {
    let (_dir, path) = temp();
    let store = open(&path);
    let held = store.lock(&lock_request("apply", 60), t0()).unwrap();
    store
        .renew(&held.id, Duration::from_secs(60), at(50))
        .unwrap();
    let renewed = store.lock_info().unwrap().unwrap();
    assert_eq!(renewed.expires, "2026-11-29T12:01:50Z");
    assert_eq!(
        (renewed.id.as_str(), renewed.created.as_str()),
        (held.id.as_str(), held.created.as_str())
    );

    // Past the first lease, within the renewed one: still held.
    assert!(matches!(
        store.lock(&lock_request("plan", 60), at(100)),
        Err(Error::Locked(_))
    ));
    assert!(store.lock(&lock_request("plan", 60), at(111)).is_ok());
}

#[test]
fn unlock_and_force_unlock_need_the_right_id() {
    let (_dir, path) = temp();
    let store = open(&path);
    let held = store.lock(&lock_request("apply", 600), t0()).unwrap();

    let err = store.unlock("not-the-holder").unwrap_err();
    assert!(matches!(err, Error::LockLost { .. }), "{err:?}");
    let err = store.force_unlock("6f1c").unwrap_err();
    assert!(
        matches!(&err, Error::LockIdMismatch { given, current } if given == "6f1c" && *current == held.id),
        "{err:?}"
    );
    expect!["lock id 6f1c does not match the current lock <lock-id>; nothing was unlocked"]
        .assert_eq(&redact(&err.to_string(), &held.id));
    assert_eq!(
        store.lock_info().unwrap().as_ref(),
        Some(&held),
        "refusals change nothing"
    );

    assert_eq!(store.force_unlock(&held.id).unwrap(), held);
    assert_eq!(store.lock_info().unwrap(), None);
    let err = store.force_unlock(&held.id).unwrap_err();
    assert!(matches!(err, Error::NotLocked { .. }), "{err:?}");
    assert!(matches!(
        store.unlock(&held.id),
        Err(Error::LockLost { current: None, .. })
    ));
}

#[test]
fn racing_lockers_on_separate_connections_never_both_win() {
    let (_dir, path) = temp();
    drop(open(&path));
    for round in 0..10 {
        let barrier = Arc::new(Barrier::new(2));
        let racers: Vec<_> = (0..2)
            .map(|_| {
                let (path, barrier) = (path.clone(), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    let store = open(&path);
                    barrier.wait();
                    store.lock(&lock_request("apply", 60), at(round))
                })
            })
            .collect();
        let results: Vec<_> = racers.into_iter().map(|r| r.join().unwrap()).collect();
        let won: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(won.len(), 1, "round {round}: {results:?}");
        assert!(
            results
                .iter()
                .any(|r| matches!(r, Err(Error::Locked(info)) if info.id == won[0].id)),
            "round {round}: {results:?}"
        );
        open(&path).unlock(&won[0].id).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn writes_with_correct_serials_are_all_kept_in_order(
        writes in proptest::collection::vec(
            ("[a-z]{1,8}", prop_oneof!["apply", "rollback", "drift --remediate"], any::<i64>()),
            0..8,
        )
    ) {
        let (_dir, path) = temp();
        let store = open(&path);
        let mut expected = vec![(0, "kiln".to_owned(), "init".to_owned(), Digest::of(b"{}").to_string())];
        for (i, (actor, operation, value)) in writes.iter().enumerate() {
            let doc = json!({ "value": value, "i": i });
            let serial = store
                .write(i as u64, &doc, &meta(actor, operation), &[], at(i as u64))
                .unwrap();
            prop_assert_eq!(serial, i as u64 + 1);
            let hash = Digest::of(serde_json::to_string(&doc).unwrap().as_bytes()).to_string();
            expected.push((serial, actor.clone(), operation.clone(), hash));
        }
        let listed: Vec<_> = store
            .versions()
            .unwrap()
            .into_iter()
            .map(|v| (v.serial, v.actor, v.operation, v.hash))
            .collect();
        prop_assert_eq!(listed, expected);
        prop_assert_eq!(store.read::<Value>().unwrap().serial, writes.len() as u64);
        store.verify().unwrap();
    }
}
