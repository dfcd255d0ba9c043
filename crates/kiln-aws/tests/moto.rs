//! The S3 state and the DynamoDB lock against a moto server (`$KILN_MOTO_URL`, started by
//! `scripts/test.sh`). Every test makes its own bucket and table, so tests run in parallel and
//! never reset the server.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers panic on a broken moto setup"
)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_config::SdkConfig;
use aws_sdk_dynamodb::types::AttributeValue;
use kiln_aws::{Current, Error, Lease, LockRequest, S3State, WriteMeta, testing};
use serde_json::json;

const T0: Duration = Duration::from_secs(1_800_000_000);
const LEASE: Duration = Duration::from_secs(30);

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + T0 + Duration::from_secs(secs)
}

/// A fresh versioned bucket and lock table, and the state `state.json` in them.
struct Env {
    conf: SdkConfig,
    s3: aws_sdk_s3::Client,
    ddb: aws_sdk_dynamodb::Client,
    bucket: String,
    table: String,
    state: S3State,
}

impl Env {
    async fn new() -> Self {
        let conf = testing::moto_conf().await;
        let id = testing::unique_id();
        let bucket = format!("kiln-test-{}", &id[..20]);
        let table = format!("kiln-locks-{id}");
        testing::versioned_bucket(&conf, &bucket).await;
        testing::lock_table(&conf, &table).await;
        let s3 = testing::s3_client(&conf);
        let ddb = aws_sdk_dynamodb::Client::new(&conf);
        let state = S3State::new(&conf, &bucket, "state.json", &table);
        Self {
            conf,
            s3,
            ddb,
            bucket,
            table,
            state,
        }
    }

    /// Another state in the same bucket and table.
    fn other(&self, key: &str) -> S3State {
        S3State::new(&self.conf, &self.bucket, key, &self.table)
    }

    /// How many versions of `key` S3 keeps.
    async fn s3_versions(&self, key: &str) -> usize {
        let out = self
            .s3
            .list_object_versions()
            .bucket(&self.bucket)
            .prefix(key)
            .send()
            .await
            .unwrap();
        out.versions()
            .iter()
            .filter(|v| v.key() == Some(key))
            .count()
    }

    /// The lock item as stored.
    async fn lock_item(&self) -> std::collections::HashMap<String, AttributeValue> {
        self.ddb
            .get_item()
            .table_name(&self.table)
            .key(
                "LockID",
                AttributeValue::S(format!("{}/state.json", self.bucket)),
            )
            .consistent_read(true)
            .send()
            .await
            .unwrap()
            .item
            .unwrap()
    }

    async fn acquire(&self, who: &str, now: SystemTime) -> Result<Lease, Error> {
        self.state.lock().acquire(&request(who), LEASE, now).await
    }

    async fn create(&self) -> Current {
        self.state
            .create("lineage-1", &json!({}), at(0))
            .await
            .unwrap()
    }
}

fn request(who: &str) -> LockRequest {
    LockRequest {
        operation: "apply".to_owned(),
        who: who.to_owned(),
        info: format!("{who} is deploying"),
    }
}

fn meta(actor: &str) -> WriteMeta {
    WriteMeta {
        actor: actor.to_owned(),
        operation: "apply".to_owned(),
    }
}

fn s(item: &std::collections::HashMap<String, AttributeValue>, name: &str) -> Option<String> {
    item.get(name).map(|v| match v {
        AttributeValue::S(s) | AttributeValue::N(s) => s.clone(),
        other => panic!("{name} is {other:?}"),
    })
}

#[tokio::test]
async fn create_read_write_round_trip_keeps_every_version() {
    let env = Env::new().await;
    // Not `check_versioning`: moto 5.2.5 answers GetBucketVersioning with the root element
    // `GetBucketVersioningResponse` instead of S3's `VersioningConfiguration`, which the SDK
    // refuses to parse.
    assert_eq!(env.state.read().await.unwrap(), None);

    let created = env.create().await;
    assert_eq!((created.lineage.as_str(), created.serial), ("lineage-1", 0));
    let again = env.state.create("lineage-2", &json!({}), at(1)).await;
    assert!(
        matches!(again, Err(Error::AlreadyExists { .. })),
        "{again:?}"
    );

    let lease = env.acquire("alice@build-1", at(1)).await.unwrap();
    assert_eq!(lease.token, 1);
    let read = env.state.read().await.unwrap().unwrap();
    assert_eq!(read, created);

    let doc1 = json!({ "services": { "web": { "stable": 1 } } });
    let v1 = env
        .state
        .write(&read, &doc1, &meta("alice@build-1"), &lease, at(2))
        .await
        .unwrap();
    assert_eq!((v1.serial, &v1.doc), (1, &doc1));
    // Non-ASCII text survives S3's ASCII-only metadata.
    let doc2 = json!({ "services": { "web": { "stable": 2 } } });
    let v2 = env
        .state
        .write(&v1, &doc2, &meta("zoë@build-2"), &lease, at(3))
        .await
        .unwrap();
    let read = env.state.read().await.unwrap().unwrap();
    assert_eq!(read, v2);
    assert_eq!(
        (read.serial, &read.doc, &read.lineage),
        (2, &doc2, &created.lineage)
    );
    assert_ne!(read.hash, v1.hash);

    let versions = env.state.versions().await.unwrap();
    let summary: Vec<_> = versions
        .iter()
        .map(|v| {
            (
                v.serial,
                v.actor.as_str(),
                v.operation.as_str(),
                v.hash.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (0, "kiln", "init", created.hash.as_str()),
            (1, "alice@build-1", "apply", v1.hash.as_str()),
            (2, "zoë@build-2", "apply", v2.hash.as_str()),
        ]
    );
    assert_eq!(versions[2].version_id, v2.version_id.clone().unwrap());
    assert_eq!(versions[1].written_at, "2027-01-15T08:00:02Z");
    assert_eq!(env.s3_versions("state.json").await, 3);

    // The stored object is the documented envelope.
    let body = env
        .s3
        .get_object()
        .bucket(&env.bucket)
        .key("state.json")
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    let stored: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        stored,
        json!({
            "lineage": "lineage-1", "serial": 2, "written_at": "2027-01-15T08:00:03Z",
            "actor": "zoë@build-2", "operation": "apply", "doc": doc2,
        })
    );
}

#[tokio::test]
async fn a_stale_writer_is_refused() {
    let env = Env::new().await;
    let v0 = env.create().await;
    let lease = env.acquire("alice", at(1)).await.unwrap();
    env.state
        .write(&v0, &json!({ "n": 1 }), &meta("alice"), &lease, at(2))
        .await
        .unwrap();

    let stale = env
        .state
        .write(&v0, &json!({ "n": 2 }), &meta("bob"), &lease, at(3))
        .await;
    assert!(
        matches!(
            stale,
            Err(Error::Stale {
                expected_serial: 0,
                found: Some(1)
            })
        ),
        "{stale:?}"
    );
    assert_eq!(env.s3_versions("state.json").await, 2);
    assert_eq!(
        env.state.read().await.unwrap().unwrap().doc,
        json!({ "n": 1 })
    );

    // Two writers racing from the same version: exactly one wins, whichever check stops
    // the other (the ETag compared up front, or S3's If-Match answering 412).
    let v1 = env.state.read().await.unwrap().unwrap();
    let (doc_a, doc_b, meta_a, meta_b) = (
        json!({ "n": "a" }),
        json!({ "n": "b" }),
        meta("a"),
        meta("b"),
    );
    let (a, b) = tokio::join!(
        env.state.write(&v1, &doc_a, &meta_a, &lease, at(4)),
        env.state.write(&v1, &doc_b, &meta_b, &lease, at(4)),
    );
    let (won, lost) = match (a, b) {
        (Ok(won), Err(lost)) | (Err(lost), Ok(won)) => (won, lost),
        other => panic!("expected one winner: {other:?}"),
    };
    assert_eq!(won.serial, 2);
    assert!(
        matches!(
            lost,
            Error::Stale {
                expected_serial: 1,
                found: Some(2)
            }
        ),
        "{lost:?}"
    );
    assert_eq!(env.s3_versions("state.json").await, 3);
    assert_eq!(env.state.read().await.unwrap().unwrap(), won);
}

#[tokio::test]
async fn a_foreign_lineage_and_a_lower_serial_are_refused() {
    let env = Env::new().await;
    let ours = env.create().await;
    let theirs = env
        .other("other.json")
        .create("lineage-other", &json!({ "other": true }), at(0))
        .await
        .unwrap();
    let lease = env.acquire("alice", at(1)).await.unwrap();

    // A version of another state handed to this one.
    let foreign = env
        .state
        .write(&theirs, &json!({}), &meta("alice"), &lease, at(2))
        .await;
    assert!(
        matches!(&foreign, Err(Error::ForeignLineage { expected, found, .. })
            if expected == "lineage-other" && found == "lineage-1"),
        "{foreign:?}"
    );
    assert_eq!(env.s3_versions("state.json").await, 1);

    // Someone restores version 0 by hand after version 1 was written.
    let v1 = env
        .state
        .write(&ours, &json!({ "n": 1 }), &meta("alice"), &lease, at(3))
        .await
        .unwrap();
    env.s3
        .copy_object()
        .bucket(&env.bucket)
        .key("state.json")
        .copy_source(format!(
            "{}/state.json?versionId={}",
            env.bucket,
            ours.version_id.clone().unwrap()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(env.state.read().await.unwrap().unwrap().serial, 0);
    let regressed = env
        .state
        .write(&v1, &json!({ "n": 2 }), &meta("alice"), &lease, at(4))
        .await;
    assert!(
        matches!(
            regressed,
            Err(Error::SerialRegressed {
                expected_serial: 1,
                found: 0
            })
        ),
        "{regressed:?}"
    );
    assert_eq!(env.s3_versions("state.json").await, 3);
}

#[tokio::test]
async fn a_second_owner_finds_the_state_locked_by_the_first() {
    let env = Env::new().await;
    let alice = env.acquire("alice@build-1", at(0)).await.unwrap();
    let bob = env.acquire("bob@build-2", at(10)).await;
    let Err(Error::Locked(info)) = &bob else {
        panic!("expected Locked, got {bob:?}");
    };
    assert_eq!(
        (
            info.id.as_str(),
            info.token,
            info.who.as_str(),
            info.operation.as_str()
        ),
        (alice.id.as_str(), 1, "alice@build-1", "apply")
    );
    assert_eq!(info.info, "alice@build-1 is deploying");
    assert_eq!(
        (info.created.as_str(), info.expires.as_str()),
        ("2027-01-15T08:00:00Z", "2027-01-15T08:00:30Z")
    );
    assert_eq!(info.expires_at, alice.expires);
    let message = bob.unwrap_err().to_string();
    assert!(
        message.contains("alice@build-1")
            && message.contains(&format!("force-unlock {}", alice.id)),
        "{message}"
    );
    assert_eq!(env.state.lock().info().await.unwrap().unwrap().id, alice.id);

    // Right at the end of the lease it is still held.
    let edge = env.acquire("bob@build-2", at(30)).await;
    assert!(matches!(edge, Err(Error::Locked(_))), "{edge:?}");

    let item = env.lock_item().await;
    assert_eq!(s(&item, "Id"), Some(alice.id.clone()));
    assert_eq!(s(&item, "Who").as_deref(), Some("alice@build-1"));
    assert_eq!(s(&item, "Token").as_deref(), Some("1"));
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_and_its_holder_fenced() {
    let env = Env::new().await;
    let v0 = env.create().await;
    let alice = env.acquire("alice", at(0)).await.unwrap();

    // Alice stalls past her lease; Bob takes over with a higher token.
    let bob = env.acquire("bob", at(31)).await.unwrap();
    assert_eq!((alice.token, bob.token), (1, 2));
    assert_ne!(alice.id, bob.id);

    let fenced = env
        .state
        .write(
            &v0,
            &json!({ "by": "alice" }),
            &meta("alice"),
            &alice,
            at(32),
        )
        .await;
    assert!(
        matches!(
            fenced,
            Err(Error::Fenced {
                token: 1,
                current: Some(2),
                ..
            })
        ),
        "{fenced:?}"
    );
    assert_eq!(env.s3_versions("state.json").await, 1);
    let renew = env.state.lock().renew(&alice, LEASE, at(32)).await;
    assert!(
        matches!(&renew, Err(Error::LockLost { current: Some(id), .. }) if *id == bob.id),
        "{renew:?}"
    );
    let release = env.state.lock().release(&alice).await;
    assert!(
        matches!(release, Err(Error::LockLost { .. })),
        "{release:?}"
    );

    let v1 = env
        .state
        .write(&v0, &json!({ "by": "bob" }), &meta("bob"), &bob, at(33))
        .await
        .unwrap();
    assert_eq!(v1.serial, 1);

    // Releasing keeps the token, so the next lease is still higher and the old ones stay fenced.
    env.state.lock().release(&bob).await.unwrap();
    let item = env.lock_item().await;
    assert_eq!(
        (s(&item, "Token").as_deref(), s(&item, "Id")),
        (Some("2"), None)
    );
    assert_eq!(env.state.lock().info().await.unwrap(), None);
    let unlocked = env
        .state
        .write(&v1, &json!({ "by": "bob" }), &meta("bob"), &bob, at(34))
        .await;
    assert!(
        matches!(
            unlocked,
            Err(Error::Fenced {
                token: 2,
                current: None,
                ..
            })
        ),
        "{unlocked:?}"
    );
    let carol = env.acquire("carol", at(35)).await.unwrap();
    assert_eq!(carol.token, 3);
    let stale_fence = env
        .state
        .write(
            &v1,
            &json!({ "by": "alice" }),
            &meta("alice"),
            &alice,
            at(36),
        )
        .await;
    assert!(
        matches!(stale_fence, Err(Error::Fenced { .. })),
        "{stale_fence:?}"
    );
}

#[tokio::test]
async fn renew_and_release_need_the_lease_id() {
    let env = Env::new().await;
    let lock = env.state.lock();
    let alice = env.acquire("alice", at(0)).await.unwrap();
    let renewed = lock.renew(&alice, LEASE, at(20)).await.unwrap();
    assert_eq!((renewed.expires, renewed.token), (at(50), alice.token));
    assert_eq!(lock.info().await.unwrap().unwrap().expires_at, at(50));
    // Without the renewal the lease would have run out at 30.
    let bob = env.acquire("bob", at(40)).await;
    assert!(matches!(bob, Err(Error::Locked(_))), "{bob:?}");

    let impostor = Lease {
        id: uuid::Uuid::new_v4().to_string(),
        ..alice.clone()
    };
    let renew = lock.renew(&impostor, LEASE, at(41)).await;
    assert!(
        matches!(&renew, Err(Error::LockLost { current: Some(id), .. }) if *id == alice.id),
        "{renew:?}"
    );
    let release = lock.release(&impostor).await;
    assert!(
        matches!(release, Err(Error::LockLost { .. })),
        "{release:?}"
    );
    assert_eq!(lock.info().await.unwrap().unwrap().id, alice.id);
    assert_eq!(lock.info().await.unwrap().unwrap().expires_at, at(50));

    lock.release(&alice).await.unwrap();
    assert_eq!(lock.info().await.unwrap(), None);
    let again = lock.release(&alice).await;
    assert!(
        matches!(again, Err(Error::LockLost { current: None, .. })),
        "{again:?}"
    );
    let bob = env.acquire("bob", at(42)).await.unwrap();
    assert_eq!(bob.token, 2);
}

#[tokio::test]
async fn force_release_names_the_lease_it_removes() {
    let env = Env::new().await;
    let lock = env.state.lock();
    let none = lock.force_release("nothing").await;
    assert!(matches!(none, Err(Error::NotLocked { .. })), "{none:?}");

    let alice = env.acquire("alice", at(0)).await.unwrap();
    let wrong = lock.force_release("not-the-lease").await;
    assert!(
        matches!(&wrong, Err(Error::LockIdMismatch { current, .. }) if *current == alice.id),
        "{wrong:?}"
    );
    assert_eq!(lock.info().await.unwrap().unwrap().id, alice.id);

    let removed = lock.force_release(&alice.id).await.unwrap();
    assert_eq!(
        (removed.id.as_str(), removed.who.as_str()),
        (alice.id.as_str(), "alice")
    );
    assert_eq!(lock.info().await.unwrap(), None);
    let release = lock.release(&alice).await;
    assert!(
        matches!(release, Err(Error::LockLost { .. })),
        "{release:?}"
    );
    let bob = env.acquire("bob", at(1)).await.unwrap();
    assert_eq!(bob.token, 2);
    assert_eq!(s(&env.lock_item().await, "Who").as_deref(), Some("bob"));
}
