//! The audit log against real SQLite files: the chain, tampering by hand with `rusqlite`, racing
//! appenders, and files from before the log existed. Time moves by hand.

#![allow(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use expect_test::expect;
use kiln_core::Digest;
use kiln_state::{
    AuditCheck, AuditEntry, Error, GENESIS_HASH, NewAuditEntry, STATE_VERSION_KIND, StateStore,
    WriteMeta,
};
use proptest::prelude::*;
use rusqlite::Connection;
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

fn raw(path: &Path) -> Connection {
    Connection::open(path).unwrap()
}

fn meta(actor: &str, operation: &str) -> WriteMeta {
    WriteMeta {
        actor: actor.to_owned(),
        operation: operation.to_owned(),
    }
}

fn entry(kind: &str, subject: &str, data: Value) -> NewAuditEntry {
    NewAuditEntry {
        actor: "alice@build-1".to_owned(),
        kind: kind.to_owned(),
        subject: subject.to_owned(),
        git_commit: Some("0123abcd".to_owned()),
        data,
    }
}

/// The hash of entry `seq` as stored, recomputed from the documented encoding without any of
/// the crate's code, as an external tool would.
fn recompute(conn: &Connection, seq: u64) -> String {
    Digest::of(preimage(conn, seq).as_bytes()).to_string()
}

fn preimage(conn: &Connection, seq: u64) -> String {
    conn.query_row(
        "SELECT seq, time, actor, kind, subject, git_commit, state_serial, state_hash, data,
                prev_hash
         FROM audit WHERE seq = ?1",
        [seq],
        |row| {
            let s = |v: String| serde_json::to_string(&v).unwrap();
            let opt = |v: Option<String>| v.map_or_else(|| "null".to_owned(), s);
            Ok(format!(
                r#"{{"actor":{},"data":{},"git_commit":{},"kind":{},"prev_hash":{},"seq":{},"state_hash":{},"state_serial":{},"subject":{},"time":{}}}"#,
                s(row.get(2)?),
                row.get::<_, String>(8)?,
                opt(row.get(5)?),
                s(row.get(3)?),
                s(row.get(9)?),
                row.get::<_, u64>(0)?,
                opt(row.get(7)?),
                row.get::<_, Option<u64>>(6)?
                    .map_or_else(|| "null".to_owned(), |n| n.to_string()),
                s(row.get(4)?),
                s(row.get(1)?),
            ))
        },
    )
    .unwrap()
}

/// Stores `hash` as entry `seq`'s hash and links entry `seq + 1` to it, as someone covering
/// their tracks would, without fixing anything further on.
fn rehash(conn: &Connection, seq: u64) -> String {
    let hash = recompute(conn, seq);
    conn.execute(
        "UPDATE audit SET hash = ?1 WHERE seq = ?2",
        rusqlite::params![hash, seq],
    )
    .unwrap();
    conn.execute(
        "UPDATE audit SET prev_hash = ?1 WHERE seq = ?2",
        rusqlite::params![hash, seq + 1],
    )
    .unwrap();
    hash
}

fn broken(check: AuditCheck) -> (u64, String) {
    match check {
        AuditCheck::Broken { seq, reason } => (seq, reason),
        ok @ AuditCheck::Ok { .. } => panic!("expected a broken log, got {ok:?}"),
    }
}

/// Replaces every `sha256:…` by its first 8 hex digits, so reasons fit in a snapshot.
fn short(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("sha256:") {
        out.push_str(&rest[..at + 7 + 8]);
        rest = &rest[at + 7 + 64..];
    }
    out.push_str(rest);
    out
}

/// A store with a small history: entries 1 (version 0), 2 (plan.approved), 3 (version 1),
/// 4 (rollout.promoted), 5 (version 2), 6 (drift.found).
fn history(path: &Path) -> StateStore {
    let store = open(path);
    store
        .append_audit(
            &[entry("plan.approved", "plan 1", json!({ "changes": 2 }))],
            at(1),
        )
        .unwrap();
    store
        .write(0, &json!({ "web": 1 }), &meta("alice", "apply"), &[], at(2))
        .unwrap();
    store
        .append_audit(
            &[entry(
                "rollout.promoted",
                "release web v1",
                json!({ "weight": 100 }),
            )],
            at(3),
        )
        .unwrap();
    store
        .write(
            1,
            &json!({ "web": 2 }),
            &meta("kiln server", "reconcile"),
            &[],
            at(4),
        )
        .unwrap();
    store
        .append_audit(
            &[entry(
                "drift.found",
                "instance web-1",
                json!({ "category": "runtime" }),
            )],
            at(5),
        )
        .unwrap();
    assert!(matches!(
        store.verify_audit().unwrap(),
        AuditCheck::Ok { entries: 6, .. }
    ));
    store
}

#[test]
fn a_new_file_logs_version_zero_and_appends_round_trip() {
    let (_dir, path) = temp();
    let store = open(&path);
    let log = store.audit(None).unwrap();
    assert_eq!(
        log,
        [AuditEntry {
            seq: 1,
            time: "2026-11-29T12:00:00Z".to_owned(),
            actor: "kiln".to_owned(),
            kind: STATE_VERSION_KIND.to_owned(),
            subject: "serial 0".to_owned(),
            git_commit: None,
            state_serial: Some(0),
            state_hash: Some(Digest::of(b"{}").to_string()),
            data: json!({ "operation": "init", "actor": "kiln" }),
            prev_hash: GENESIS_HASH.to_owned(),
            hash: log[0].hash.clone(),
        }]
    );

    let appended = store
        .append_audit(
            &[
                entry("plan.approved", "plan 7", json!({ "changes": 3 })),
                NewAuditEntry {
                    git_commit: None,
                    data: Value::Null,
                    ..entry("policy.passed", "plan 7", Value::Null)
                },
            ],
            at(5),
        )
        .unwrap();
    assert_eq!(appended.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3]);
    assert_eq!(appended[0].prev_hash, log[0].hash);
    assert_eq!(appended[1].prev_hash, appended[0].hash);
    assert!(appended.iter().all(|e| e.state_serial == Some(0)
        && e.state_hash == log[0].state_hash
        && e.time == "2026-11-29T12:00:05Z"));
    assert_eq!(store.audit(None).unwrap()[1..], appended[..]);
    assert_eq!(
        store.verify_audit().unwrap(),
        AuditCheck::Ok {
            entries: 3,
            head: appended[1].hash.clone()
        }
    );

    // Nothing to append changes nothing; reopening adds nothing.
    assert_eq!(store.append_audit(&[], at(6)).unwrap(), []);
    let reopened = StateStore::open(&path, at(7)).unwrap();
    assert_eq!(reopened.audit(None).unwrap().len(), 3);

    // `since` keeps entries appended at or after a time; stored times are whole seconds.
    let seqs = |since| -> Vec<u64> {
        store
            .audit(Some(since))
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect()
    };
    assert_eq!(seqs("2026-11-29T12:00:00Z"), [1, 2, 3]);
    assert_eq!(seqs("2026-11-29T12:00:04.5Z"), [2, 3]);
    assert_eq!(seqs("2026-11-29T12:00:05Z"), [2, 3]);
    assert_eq!(seqs("2026-11-29T12:00:05.001Z"), [] as [u64; 0]);
    let err = store.audit(Some("last tuesday")).unwrap_err();
    expect!["invalid time `last tuesday`: timestamp format is invalid; expected RFC 3339 in UTC, e.g. 2026-11-29T12:00:00Z"]
        .assert_eq(&err.to_string());
}

#[test]
fn the_hash_encoding_is_pinned() {
    let (_dir, path) = temp();
    let store = open(&path);
    let appended = store
        .append_audit(
            &[entry(
                "plan.approved",
                "plan \"7\" for café",
                json!({ "z": [1, 2.5, null], "a": { "y": true, "b": "line\nbreak" } }),
            )],
            at(1),
        )
        .unwrap();
    let conn = raw(&path);

    // Entry 1 depends on nothing random (not even the lineage): a fixed test vector.
    expect![[r#"{"actor":"kiln","data":{"actor":"kiln","operation":"init"},"git_commit":null,"kind":"state_version","prev_hash":"sha256:0000000000000000000000000000000000000000000000000000000000000000","seq":1,"state_hash":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","state_serial":0,"subject":"serial 0","time":"2026-11-29T12:00:00Z"}"#]]
        .assert_eq(&preimage(&conn, 1));
    expect!["sha256:6d4fe2c5c16f0ff98dd8136cc26feb938f5eb3af959a1661bda6f8cdc4e1c234"]
        .assert_eq(&recompute(&conn, 1));
    assert_eq!(store.audit(None).unwrap()[0].hash, recompute(&conn, 1));

    // `data` is stored canonically: keys sorted, no whitespace.
    let data: String = conn
        .query_row("SELECT data FROM audit WHERE seq = 2", [], |row| row.get(0))
        .unwrap();
    expect![[r#"{"a":{"b":"line\nbreak","y":true},"z":[1,2.5,null]}"#]].assert_eq(&data);
    expect![[r#"{"actor":"alice@build-1","data":{"a":{"b":"line\nbreak","y":true},"z":[1,2.5,null]},"git_commit":"0123abcd","kind":"plan.approved","prev_hash":"sha256:6d4fe2c5c16f0ff98dd8136cc26feb938f5eb3af959a1661bda6f8cdc4e1c234","seq":2,"state_hash":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","state_serial":0,"subject":"plan \"7\" for café","time":"2026-11-29T12:00:01Z"}"#]]
        .assert_eq(&preimage(&conn, 2));
    assert_eq!(appended[0].hash, recompute(&conn, 2));
    // Also what the Python recipe in the crate docs computes.
    expect!["sha256:765c6ea09817036f582495d65e9d9981f0ea14de736a1f36efc849b866c6255f"]
        .assert_eq(&appended[0].hash);
}

#[test]
fn state_writes_and_appends_form_one_chain() {
    let (_dir, path) = temp();
    let store = open(&path);
    let mut expected_entries = 1;
    for round in 0..10u64 {
        if round % 2 == 0 {
            store
                .write(
                    round,
                    &json!({ "round": round }),
                    &meta("alice", "apply"),
                    &[],
                    at(round),
                )
                .unwrap();
            expected_entries += 1;
        } else {
            let (serial, logged) = store
                .write_with_audit(
                    round,
                    &json!({ "round": round }),
                    &meta("kiln server", "reconcile"),
                    &[],
                    &[entry("rollout.step", "web", json!({ "round": round }))],
                    at(round),
                )
                .unwrap();
            assert_eq!(serial, round + 1);
            assert_eq!(
                logged
                    .iter()
                    .map(|e| (e.kind.as_str(), e.subject.as_str(), e.state_serial))
                    .collect::<Vec<_>>(),
                [
                    (
                        STATE_VERSION_KIND,
                        format!("serial {serial}").as_str(),
                        Some(serial)
                    ),
                    ("rollout.step", "web", Some(serial)),
                ]
            );
            assert_eq!(
                logged[0].data,
                json!({ "operation": "reconcile", "actor": "kiln server" })
            );
            expected_entries += 2;
        }
        let decided = store
            .append_audit(
                &[entry("analysis.judged", "web", json!({ "round": round }))],
                at(round),
            )
            .unwrap();
        assert_eq!(decided[0].state_serial, Some(round + 1));
        expected_entries += 1;

        // A write that loses its race logs nothing, and a forged state version is refused.
        assert!(matches!(
            store.write(round, &json!({}), &meta("bob", "apply"), &[], at(round)),
            Err(Error::Conflict { .. })
        ));
        let forged = entry(STATE_VERSION_KIND, "serial 99", Value::Null);
        let err = store
            .append_audit(std::slice::from_ref(&forged), at(round))
            .unwrap_err();
        expect!["audit entries of kind state_version are reserved for the state versions kiln records itself"]
            .assert_eq(&err.to_string());
        assert!(matches!(
            store.write_with_audit(
                round + 1,
                &json!({}),
                &meta("bob", "apply"),
                &[],
                &[forged],
                at(round)
            ),
            Err(Error::ReservedAuditKind { .. })
        ));
    }

    let log = store.audit(None).unwrap();
    assert_eq!(log.len(), expected_entries);
    let mut prev = GENESIS_HASH.to_owned();
    for (i, e) in log.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1);
        assert_eq!(e.prev_hash, prev);
        prev.clone_from(&e.hash);
    }
    // Every version is logged once, in order, with the hash recorded in `versions`.
    let logged: Vec<_> = log
        .iter()
        .filter(|e| e.kind == STATE_VERSION_KIND)
        .map(|e| (e.state_serial.unwrap(), e.state_hash.clone().unwrap()))
        .collect();
    let versions: Vec<_> = store
        .versions()
        .unwrap()
        .into_iter()
        .map(|v| (v.serial, v.hash))
        .collect();
    assert_eq!(logged, versions);
    assert_eq!(
        store.verify_audit().unwrap(),
        AuditCheck::Ok {
            entries: expected_entries as u64,
            head: prev
        }
    );
    assert_eq!(
        serde_json::to_value(store.verify_audit().unwrap()).unwrap()["status"],
        "ok"
    );
}

#[test]
fn an_entry_edited_by_hand_is_named() {
    let (_dir, path) = temp();
    let store = history(&path);
    let conn = raw(&path);
    let original: String = conn
        .query_row("SELECT data FROM audit WHERE seq = 4", [], |row| row.get(0))
        .unwrap();

    conn.execute(
        r#"UPDATE audit SET data = '{"weight":0}' WHERE seq = 4"#,
        [],
    )
    .unwrap();
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 4);
    let recorded = store.audit(None).unwrap()[3].hash.clone();
    assert_eq!(
        reason,
        format!(
            "its content hashes to {}, but it records {recorded}: the entry was changed after it was written",
            recompute(&conn, 4)
        )
    );

    // Any column counts, not only `data`.
    conn.execute("UPDATE audit SET data = ?1 WHERE seq = 4", [&original])
        .unwrap();
    assert!(store.verify_audit().unwrap().is_ok());
    for edit in [
        "UPDATE audit SET actor = 'mallory' WHERE seq = 2",
        "UPDATE audit SET time = '2026-11-29T11:00:00Z' WHERE seq = 2",
        "UPDATE audit SET git_commit = NULL WHERE seq = 2",
        "UPDATE audit SET state_serial = 1 WHERE seq = 2",
    ] {
        conn.execute(edit, []).unwrap();
        assert_eq!(broken(store.verify_audit().unwrap()).0, 2, "{edit}");
        conn.execute(
            "UPDATE audit SET actor = 'alice@build-1', time = '2026-11-29T12:00:01Z',
                              git_commit = '0123abcd', state_serial = 0
             WHERE seq = 2",
            [],
        )
        .unwrap();
        assert!(store.verify_audit().unwrap().is_ok(), "{edit}");
    }

    // Edited, with its hash recomputed: the next entry's link names it.
    conn.execute(
        r#"UPDATE audit SET data = '{"weight":0}' WHERE seq = 4"#,
        [],
    )
    .unwrap();
    let forged = recompute(&conn, 4);
    conn.execute("UPDATE audit SET hash = ?1 WHERE seq = 4", [&forged])
        .unwrap();
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 5);
    assert_eq!(
        reason,
        format!(
            "its prev_hash is {recorded}, but entry 4 hashes to {forged}: entries were rewritten or reordered"
        )
    );
    // …and fixing that link too breaks entry 5's own hash.
    rehash(&conn, 4);
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 5);
    assert!(
        reason.starts_with("its content hashes to sha256:"),
        "{reason}"
    );
}

#[test]
fn a_consistent_rewrite_is_only_caught_by_a_copy_of_the_head() {
    let (_dir, path) = temp();
    let store = history(&path);
    let AuditCheck::Ok { head, .. } = store.verify_audit().unwrap() else {
        unreachable!()
    };
    let conn = raw(&path);
    conn.execute(
        r#"UPDATE audit SET data = '{"changes":0}' WHERE seq = 2"#,
        [],
    )
    .unwrap();
    for seq in 2..=6 {
        rehash(&conn, seq);
    }
    match store.verify_audit().unwrap() {
        AuditCheck::Ok {
            entries: 6,
            head: new_head,
        } => assert_ne!(new_head, head, "only the head shows the rewrite"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_deleted_entry_is_named() {
    let (_dir, path) = temp();
    let store = history(&path);
    let conn = raw(&path);

    conn.execute("DELETE FROM audit WHERE seq = 4", []).unwrap();
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 4);
    expect!["entry 4 is missing: entry 3 is followed by entry 5"].assert_eq(&reason);

    conn.execute("DELETE FROM audit WHERE seq = 1", []).unwrap();
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 1);
    expect!["entry 1 is missing: the log starts with entry 2"].assert_eq(&reason);
}

#[test]
fn a_deleted_state_version_entry_at_the_end_leaves_its_version_uncovered() {
    let (_dir, path) = temp();
    let store = history(&path);
    let conn = raw(&path);

    // The last entry is a decision: cutting it off is only visible in the head.
    conn.execute("DELETE FROM audit WHERE seq = 6", []).unwrap();
    assert!(matches!(
        store.verify_audit().unwrap(),
        AuditCheck::Ok { entries: 5, .. }
    ));
    // The entry of version 2 is the last now: without it, version 2 is in no entry.
    conn.execute("DELETE FROM audit WHERE seq = 5", []).unwrap();
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 5);
    expect!["state version 2 is not in the log: the log ends at entry 4, which has state versions up to 1"]
        .assert_eq(&reason);
}

#[test]
fn a_state_version_edited_after_it_was_logged_is_named() {
    let (_dir, path) = temp();
    let store = history(&path);
    let conn = raw(&path);
    let logged = store.versions().unwrap()[1].hash.clone();

    // Doc and recorded hash both rewritten: `verify` sees nothing, the log does.
    let doc = r#"{"web":100}"#;
    let hash = Digest::of(doc.as_bytes()).to_string();
    conn.execute(
        "UPDATE versions SET doc = ?1, hash = ?2 WHERE serial = 1",
        [doc, &hash],
    )
    .unwrap();
    store.verify().unwrap();
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 3, "the state_version entry of serial 1");
    assert_eq!(
        reason,
        format!(
            "state version 1 now hashes to {hash}, but the log recorded {logged}: the state was changed after it was logged"
        )
    );

    // A version deleted outright.
    conn.execute(
        r#"UPDATE versions SET doc = '{"web":1}', hash = ?1 WHERE serial = 1"#,
        [&logged],
    )
    .unwrap();
    assert!(store.verify_audit().unwrap().is_ok());
    conn.execute("DELETE FROM versions WHERE serial = 1", [])
        .unwrap();
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 3);
    expect!["state version 1, which it records, is missing from the state"].assert_eq(&reason);
}

#[test]
fn a_state_version_written_outside_kiln_is_named() {
    let (_dir, path) = temp();
    let store = history(&path);
    let conn = raw(&path);
    let doc = r#"{"web":9}"#;
    conn.execute(
        "INSERT INTO versions (serial, written_at, actor, operation, hash, doc)
         VALUES (3, '2026-11-29T13:00:00Z', 'mallory', 'hand edit', ?1, ?2)",
        [Digest::of(doc.as_bytes()).to_string().as_str(), doc],
    )
    .unwrap();
    store.verify().unwrap();
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 7, "where its entry should be");
    expect!["state version 3 is not in the log: the log ends at entry 6, which has state versions up to 2"]
        .assert_eq(&reason);

    // Once kiln writes on top of it, the gap is inside the log.
    store
        .write(3, &json!({}), &meta("alice", "apply"), &[], at(9))
        .unwrap();
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 7);
    assert_eq!(
        reason,
        "state version 3 is not in the log: this entry records serial 4"
    );
}

#[test]
fn reordered_entries_are_named() {
    let (_dir, path) = temp();
    let store = history(&path);
    let conn = raw(&path);
    conn.execute_batch(
        "UPDATE audit SET seq = 100 WHERE seq = 3;
         UPDATE audit SET seq = 3 WHERE seq = 4;
         UPDATE audit SET seq = 4 WHERE seq = 100;",
    )
    .unwrap();
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 3);
    assert!(reason.starts_with("its content hashes to "), "{reason}");

    // Rehashed: it matches its content, but not the entry before it.
    rehash(&conn, 3);
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 3);
    assert!(reason.starts_with("its prev_hash is "), "{reason}");

    // Relinked and rehashed to the end: every entry matches its content and links to the
    // one before; the state references still show the order.
    conn.execute(
        "UPDATE audit SET prev_hash = (SELECT hash FROM audit WHERE seq = 2) WHERE seq = 3",
        [],
    )
    .unwrap();
    for seq in 3..=6 {
        rehash(&conn, seq);
    }
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 3);
    expect!["it refers to state version 1 (sha256:e3aa0d16), but the newest state version logged before it is state version 0 (sha256:44136fa3)"].assert_eq(&short(&reason));
}

#[test]
fn concurrent_appenders_on_separate_connections_keep_one_chain() {
    let (_dir, path) = temp();
    drop(open(&path));
    let rounds = 25;
    let barrier = Arc::new(Barrier::new(2));
    let racers: Vec<_> = (0..2)
        .map(|n| {
            let (path, barrier) = (path.clone(), Arc::clone(&barrier));
            std::thread::spawn(move || {
                let store = open(&path);
                let mut appended = 0;
                let mut written = 0;
                for round in 0..rounds {
                    barrier.wait();
                    let actor = format!("writer-{n}");
                    let batch = [
                        entry("race.a", &actor, json!({ "round": round })),
                        entry("race.b", &actor, json!({ "round": round })),
                    ];
                    appended += store.append_audit(&batch, at(round)).unwrap().len();
                    let current = store.read::<Value>().unwrap();
                    match store.write(
                        current.serial,
                        &json!({ "by": n, "round": round }),
                        &meta(&actor, "apply"),
                        &[],
                        at(round),
                    ) {
                        Ok(_) => written += 1,
                        Err(Error::Conflict { .. }) => {}
                        Err(other) => panic!("{other}"),
                    }
                }
                (appended, written)
            })
        })
        .collect();
    let (appended, written) = racers
        .into_iter()
        .map(|r| r.join().unwrap())
        .fold((0, 0), |(a, w), (ra, rw)| (a + ra, w + rw));
    assert_eq!(appended, 2 * 2 * rounds as usize);

    let store = open(&path);
    let log = store.audit(None).unwrap();
    assert_eq!(log.len(), 1 + appended + written);
    assert_eq!(store.read::<Value>().unwrap().serial, written as u64);
    // Each batch is contiguous: nothing interleaves within a transaction.
    for pair in log.iter().filter(|e| e.kind == "race.a") {
        let next = &log[pair.seq as usize];
        assert_eq!(
            (next.kind.as_str(), &next.subject),
            ("race.b", &pair.subject)
        );
    }
    assert_eq!(
        store.verify_audit().unwrap(),
        AuditCheck::Ok {
            entries: log.len() as u64,
            head: log.last().unwrap().hash.clone()
        }
    );
}

/// The schema of files from before the audit log: migration 1, frozen.
const SCHEMA_1: &str = r"
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
    CREATE TABLE versions (
        serial     INTEGER PRIMARY KEY CHECK (serial >= 0),
        written_at TEXT NOT NULL,
        actor      TEXT NOT NULL,
        operation  TEXT NOT NULL,
        hash       TEXT NOT NULL,
        doc        TEXT NOT NULL
    ) STRICT;
    CREATE TABLE events (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        time    TEXT NOT NULL,
        service TEXT,
        kind    TEXT NOT NULL,
        message TEXT NOT NULL,
        data    TEXT NOT NULL
    ) STRICT;
    CREATE TABLE lock (
        slot       INTEGER PRIMARY KEY CHECK (slot = 1),
        id         TEXT NOT NULL,
        operation  TEXT NOT NULL,
        who        TEXT NOT NULL,
        info       TEXT NOT NULL,
        host       TEXT NOT NULL,
        boot_id    TEXT,
        pid        INTEGER NOT NULL,
        pid_start  INTEGER,
        created    TEXT NOT NULL,
        expires    TEXT NOT NULL,
        expires_ms INTEGER NOT NULL
    ) STRICT;
    PRAGMA user_version = 1;
";

/// A state file as the kiln before the audit log left it, with versions 0 to 2 (the JSON of
/// version `edited`, if any, changed afterwards by hand).
fn old_file(path: &Path, edited: Option<u64>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let conn = raw(path);
    conn.execute_batch(SCHEMA_1).unwrap();
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('lineage', '6c1b2b8e-5d5e-4d7b-9a51-0d6f3c1a2b3c')",
        [],
    )
    .unwrap();
    for (serial, actor, operation, doc) in [
        (0, "kiln", "init", "{}"),
        (1, "alice", "apply", r#"{"web":1}"#),
        (2, "kiln server", "reconcile", r#"{"web":2}"#),
    ] {
        let hash = Digest::of(doc.as_bytes()).to_string();
        let stored = if edited == Some(serial) {
            r#"{"web":50}"#
        } else {
            doc
        };
        conn.execute(
            "INSERT INTO versions (serial, written_at, actor, operation, hash, doc)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            rusqlite::params![
                serial,
                format!("2026-11-2{}T12:00:00Z", serial + 1),
                actor,
                operation,
                hash,
                stored
            ],
        )
        .unwrap();
    }
    conn.execute(
        "INSERT INTO events (time, service, kind, message, data)
         VALUES ('2026-11-22T12:00:00Z', 'web', 'release.created', 'web v1', '{}')",
        [],
    )
    .unwrap();
}

#[test]
fn an_old_state_file_migrates_and_its_versions_enter_the_log() {
    let (_dir, path) = temp();
    old_file(&path, None);
    let store = StateStore::open(&path, at(100)).unwrap();
    let version: u32 = raw(&path)
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .unwrap();
    assert_eq!(version, 2);

    // Nothing else changed.
    assert_eq!(
        store.lineage().unwrap(),
        "6c1b2b8e-5d5e-4d7b-9a51-0d6f3c1a2b3c"
    );
    let state = store.read::<Value>().unwrap();
    assert_eq!((state.serial, state.doc), (2, json!({ "web": 2 })));
    assert_eq!(store.events(0, 10).unwrap().len(), 1);
    store.verify().unwrap();

    let log: String = store
        .audit(None)
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{} {} {} {} {:?} {:?} {}\n",
                e.seq, e.time, e.kind, e.subject, e.actor, e.state_serial, e.data
            )
        })
        .collect();
    expect![[r#"
        1 2026-11-29T12:01:40Z state_version serial 0 "kiln" Some(0) {"actor":"kiln","backfilled":true,"operation":"init","written_at":"2026-11-21T12:00:00Z"}
        2 2026-11-29T12:01:40Z state_version serial 1 "alice" Some(1) {"actor":"alice","backfilled":true,"operation":"apply","written_at":"2026-11-22T12:00:00Z"}
        3 2026-11-29T12:01:40Z state_version serial 2 "kiln server" Some(2) {"actor":"kiln server","backfilled":true,"operation":"reconcile","written_at":"2026-11-23T12:00:00Z"}
    "#]]
    .assert_eq(&log);
    assert!(matches!(
        store.verify_audit().unwrap(),
        AuditCheck::Ok { entries: 3, .. }
    ));

    // Writes go on from there; reopening backfills nothing twice.
    store
        .write(
            2,
            &json!({ "web": 3 }),
            &meta("alice", "apply"),
            &[],
            at(200),
        )
        .unwrap();
    drop(store);
    let store = StateStore::open(&path, at(300)).unwrap();
    assert!(matches!(
        store.verify_audit().unwrap(),
        AuditCheck::Ok { entries: 4, .. }
    ));
}

#[test]
fn a_version_edited_before_the_migration_is_still_found() {
    let (_dir, path) = temp();
    old_file(&path, Some(1));
    let store = StateStore::open(&path, at(100)).unwrap();
    let (seq, reason) = broken(store.verify_audit().unwrap());
    assert_eq!(seq, 2);
    assert!(
        reason.starts_with("state version 1 now hashes to sha256:"),
        "{reason}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// Whatever the history, changing any one column of any one entry names that entry.
    #[test]
    fn any_edit_of_one_entry_names_it(
        ops in proptest::collection::vec(any::<bool>(), 1..10),
        pick in any::<prop::sample::Index>(),
        column in prop_oneof![
            Just("actor = actor || 'x'"),
            Just("kind = kind || 'x'"),
            Just("subject = subject || 'x'"),
            Just("data = '[' || data || ']'"),
            Just("time = '2000-01-01T00:00:00Z'"),
            Just("git_commit = 'feed'"),
            Just("state_hash = 'sha256:x'"),
            Just("prev_hash = 'sha256:y'"),
            Just("hash = 'sha256:z'"),
        ],
    ) {
        let (_dir, path) = temp();
        let store = open(&path);
        let mut serial = 0;
        for (i, write) in ops.iter().enumerate() {
            if *write {
                serial = store
                    .write(serial, &json!({ "i": i }), &meta("alice", "apply"), &[], at(i as u64))
                    .unwrap();
            } else {
                store
                    .append_audit(&[entry("decided", "web", json!({ "i": i }))], at(i as u64))
                    .unwrap();
            }
        }
        let entries = store.audit(None).unwrap().len();
        prop_assert!(store.verify_audit().unwrap().is_ok());
        let seq = pick.index(entries) as u64 + 1;
        raw(&path)
            .execute(&format!("UPDATE audit SET {column} WHERE seq = ?1"), [seq])
            .unwrap();
        prop_assert_eq!(broken(store.verify_audit().unwrap()).0, seq);
    }
}
