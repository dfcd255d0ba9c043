//! The state document in S3: one JSON object per state, every write a conditional PUT.
//!
//! The object's body is `{"lineage", "serial", "written_at", "actor", "operation", "doc"}`. Its
//! user metadata repeats everything but the document (`kiln-lineage`, `kiln-serial`,
//! `kiln-written-at`, `kiln-actor`, `kiln-operation`) plus `kiln-hash`, so that versions can
//! be listed and checked with HEAD requests.

use std::collections::HashMap;
use std::time::SystemTime;

use aws_config::SdkConfig;
use aws_sdk_s3::Client;
use aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::BucketVersioningStatus;
use kiln_core::Digest;
use serde::{Deserialize, Serialize};

use crate::config::s3_client;
use crate::time::rfc3339;
use crate::{DynamoLock, Error, Lease, Result, meta};

/// Who writes a version and why, recorded with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteMeta {
    /// The person or system writing, e.g. `alice@build-1` or `kiln server`.
    pub actor: String,
    /// The command or step, e.g. `apply` or `drift --remediate`.
    pub operation: String,
}

/// The newest version of the state, as read.
#[derive(Debug, Clone, PartialEq)]
pub struct Current {
    /// The uuid of this state's history.
    pub lineage: String,
    /// The version number: 0 when created, then +1 per write.
    pub serial: u64,
    /// When it was written (RFC 3339).
    pub written_at: String,
    /// The document.
    pub doc: serde_json::Value,
    /// The object's ETag: the next write is conditional on it.
    pub etag: String,
    /// The S3 version id, when the bucket keeps versions.
    pub version_id: Option<String>,
    /// `sha256:<hex>` of the document's JSON (recomputed from what was read).
    pub hash: String,
}

/// One stored version, without its document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// The version number.
    pub serial: u64,
    /// The S3 version id.
    pub version_id: String,
    /// When it was written (RFC 3339).
    pub written_at: String,
    /// Who wrote it.
    pub actor: String,
    /// Why.
    pub operation: String,
    /// `sha256:<hex>` of its document's JSON, as recorded when it was written.
    pub hash: String,
}

/// The stored object.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope<D> {
    lineage: String,
    serial: u64,
    written_at: String,
    actor: String,
    operation: String,
    doc: D,
}

/// A state document in S3, with its lock in DynamoDB.
#[derive(Debug, Clone)]
pub struct S3State {
    client: Client,
    bucket: String,
    key: String,
    lock: DynamoLock,
}

impl S3State {
    /// The state at `s3://bucket/key`, locked through the item `<bucket>/<key>` of the
    /// DynamoDB table `lock_table`.
    pub fn new(
        conf: &SdkConfig,
        bucket: impl Into<String>,
        key: impl Into<String>,
        lock_table: impl Into<String>,
    ) -> Self {
        let (bucket, key) = (bucket.into(), key.into());
        let lock = DynamoLock::new(conf, lock_table, format!("{bucket}/{key}"));
        Self {
            client: s3_client(conf),
            bucket,
            key,
            lock,
        }
    }

    /// The state's lock.
    pub fn lock(&self) -> &DynamoLock {
        &self.lock
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The object key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Fails with [`Error::VersioningDisabled`] unless the bucket keeps every version.
    pub async fn check_versioning(&self) -> Result<()> {
        let out = self
            .client
            .get_bucket_versioning()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|err| self.aws("GetBucketVersioning", &err))?;
        if out.status() == Some(&BucketVersioningStatus::Enabled) {
            Ok(())
        } else {
            Err(Error::VersioningDisabled {
                bucket: self.bucket.clone(),
            })
        }
    }

    /// The newest version, or `None` when the state was never created.
    pub async fn read(&self) -> Result<Option<Current>> {
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&self.key)
            .send()
            .await
        {
            Ok(out) => out,
            Err(err)
                if err.as_service_error().is_some_and(
                    aws_sdk_s3::operation::get_object::GetObjectError::is_no_such_key,
                ) =>
            {
                return Ok(None);
            }
            Err(err) => return Err(self.aws("GetObject", &err)),
        };
        let etag = out
            .e_tag()
            .ok_or_else(|| self.damaged("S3 returned no ETag"))?
            .to_owned();
        let version_id = out.version_id().map(str::to_owned);
        let bytes = out
            .body
            .collect()
            .await
            .map_err(|err| self.aws("GetObject", &err))?
            .into_bytes();
        let envelope: Envelope<serde_json::Value> = serde_json::from_slice(&bytes)
            .map_err(|err| self.damaged(&format!("not a kiln state object: {err}")))?;
        let hash = hash_of(&envelope.doc)?;
        Ok(Some(Current {
            lineage: envelope.lineage,
            serial: envelope.serial,
            written_at: envelope.written_at,
            doc: envelope.doc,
            etag,
            version_id,
            hash,
        }))
    }

    /// Creates the state as serial 0 of `lineage` holding `doc`, only if no object exists
    /// (`If-None-Match: *`); fails with [`Error::AlreadyExists`] otherwise.
    pub async fn create<T: Serialize + ?Sized>(
        &self,
        lineage: &str,
        doc: &T,
        now: SystemTime,
    ) -> Result<Current> {
        let meta = WriteMeta {
            actor: "kiln".to_owned(),
            operation: "init".to_owned(),
        };
        let (request, put) = self.put(lineage, 0, doc, &meta, now)?;
        match request.if_none_match("*").send().await {
            Ok(out) => Ok(put.current(&out)),
            Err(err) if status(&err) == Some(412) => Err(Error::AlreadyExists {
                bucket: self.bucket.clone(),
                key: self.key.clone(),
            }),
            Err(err) => Err(self.aws("PutObject", &err)),
        }
    }

    /// Stores `doc` as serial `expected.serial + 1`, provided `expected` is still the newest
    /// version (`If-Match` on its ETag) and `fence` still holds the state's lock.
    ///
    /// Fails, changing nothing, with [`Error::Fenced`] when the lock's fencing token is no
    /// longer `fence.token` (the lease was taken over or released), [`Error::ForeignLineage`]
    /// when the stored state is another history, [`Error::SerialRegressed`] when its serial
    /// went below `expected.serial`, and [`Error::Stale`] when another write came first.
    ///
    /// The fence is checked with a consistent read just before the conditional PUT; S3 cannot
    /// make the PUT conditional on DynamoDB, so a takeover in that instant is caught only by
    /// the new holder's own `If-Match` (it reads after our write and moves on from it).
    pub async fn write<T: Serialize + ?Sized>(
        &self,
        expected: &Current,
        doc: &T,
        meta: &WriteMeta,
        fence: &Lease,
        now: SystemTime,
    ) -> Result<Current> {
        let token = self.lock.token().await?;
        if token.as_ref().map(|(t, id)| (*t, id.as_deref())) != Some((fence.token, Some(&fence.id)))
        {
            return Err(Error::Fenced {
                lease_id: fence.id.clone(),
                token: fence.token,
                current: token.and_then(|(t, id)| id.map(|_| t)),
            });
        }
        let stored = self.head(None).await?.ok_or_else(|| Error::Missing {
            bucket: self.bucket.clone(),
            key: self.key.clone(),
        })?;
        if stored.lineage != expected.lineage {
            return Err(Error::ForeignLineage {
                bucket: self.bucket.clone(),
                key: self.key.clone(),
                expected: expected.lineage.clone(),
                found: stored.lineage,
            });
        }
        if stored.serial < expected.serial {
            return Err(Error::SerialRegressed {
                expected_serial: expected.serial,
                found: stored.serial,
            });
        }
        if stored.etag != expected.etag {
            return Err(Error::Stale {
                expected_serial: expected.serial,
                found: Some(stored.serial),
            });
        }
        let (request, put) = self.put(&expected.lineage, expected.serial + 1, doc, meta, now)?;
        match request.if_match(&expected.etag).send().await {
            Ok(out) => {
                tracing::debug!(
                    bucket = self.bucket,
                    key = self.key,
                    serial = expected.serial + 1,
                    actor = meta.actor,
                    operation = meta.operation,
                    "state written"
                );
                Ok(put.current(&out))
            }
            Err(err) if matches!(status(&err), Some(412 | 404)) => Err(Error::Stale {
                expected_serial: expected.serial,
                found: self.head(None).await.ok().flatten().map(|h| h.serial),
            }),
            Err(err) => Err(self.aws("PutObject", &err)),
        }
    }

    /// Every version kept by the bucket, oldest first (delete markers and objects that are
    /// not kiln states are skipped).
    pub async fn versions(&self) -> Result<Vec<VersionInfo>> {
        let mut ids = Vec::new();
        let (mut key_marker, mut version_marker) = (None, None);
        loop {
            let out = self
                .client
                .list_object_versions()
                .bucket(&self.bucket)
                .prefix(&self.key)
                .set_key_marker(key_marker)
                .set_version_id_marker(version_marker)
                .send()
                .await
                .map_err(|err| self.aws("ListObjectVersions", &err))?;
            ids.extend(
                out.versions()
                    .iter()
                    .filter(|v| v.key() == Some(self.key.as_str()))
                    .filter_map(|v| v.version_id().map(str::to_owned)),
            );
            if out.is_truncated() != Some(true) {
                break;
            }
            key_marker = out.next_key_marker().map(str::to_owned);
            version_marker = out.next_version_id_marker().map(str::to_owned);
        }
        let mut versions = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(head) = self.head(Some(&id)).await? {
                versions.push(VersionInfo {
                    serial: head.serial,
                    version_id: id,
                    written_at: head.written_at,
                    actor: head.actor,
                    operation: head.operation,
                    hash: head.hash,
                });
            }
        }
        versions.sort_by_key(|v| v.serial);
        Ok(versions)
    }

    /// A PUT of serial `serial`, not yet sent: the caller adds its condition.
    fn put<T: Serialize + ?Sized>(
        &self,
        lineage: &str,
        serial: u64,
        doc: &T,
        meta: &WriteMeta,
        now: SystemTime,
    ) -> Result<(PutObjectFluentBuilder, Put)> {
        let doc = serde_json::to_value(doc).map_err(Error::Encode)?;
        let hash = hash_of(&doc)?;
        let envelope = Envelope {
            lineage: lineage.to_owned(),
            serial,
            written_at: rfc3339(now),
            actor: meta.actor.clone(),
            operation: meta.operation.clone(),
            doc,
        };
        let body = serde_json::to_vec(&envelope).map_err(Error::Encode)?;
        let request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&self.key)
            .content_type("application/json")
            .metadata("kiln-lineage", meta::encode(&envelope.lineage))
            .metadata("kiln-serial", serial.to_string())
            .metadata("kiln-written-at", &envelope.written_at)
            .metadata("kiln-actor", meta::encode(&envelope.actor))
            .metadata("kiln-operation", meta::encode(&envelope.operation))
            .metadata("kiln-hash", &hash)
            .body(ByteStream::from(body));
        Ok((request, Put { envelope, hash }))
    }

    /// The metadata of the newest version, or of version `version_id`; `None` if missing.
    async fn head(&self, version_id: Option<&str>) -> Result<Option<Head>> {
        let out = match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&self.key)
            .set_version_id(version_id.map(str::to_owned))
            .send()
            .await
        {
            Ok(out) => out,
            Err(err)
                if err.as_service_error().is_some_and(
                    aws_sdk_s3::operation::head_object::HeadObjectError::is_not_found,
                ) =>
            {
                return Ok(None);
            }
            Err(err) => return Err(self.aws("HeadObject", &err)),
        };
        let etag = out
            .e_tag()
            .ok_or_else(|| self.damaged("S3 returned no ETag"))?
            .to_owned();
        let empty = HashMap::new();
        let metadata = out.metadata().unwrap_or(&empty);
        let field = |name: &str| metadata.get(name).and_then(|v| meta::decode(v));
        let parsed = (|| {
            Some(Head {
                lineage: field("kiln-lineage")?,
                serial: field("kiln-serial")?.parse().ok()?,
                written_at: field("kiln-written-at")?,
                actor: field("kiln-actor")?,
                operation: field("kiln-operation")?,
                hash: field("kiln-hash")?,
                etag: etag.clone(),
            })
        })();
        match parsed {
            Some(head) => Ok(Some(head)),
            // Not written by kiln (or by hand): fall back to the body.
            None => self.head_from_body(version_id, etag).await,
        }
    }

    /// [`Self::head`] for an object without kiln's metadata: reads the body.
    async fn head_from_body(&self, version_id: Option<&str>, etag: String) -> Result<Option<Head>> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&self.key)
            .set_version_id(version_id.map(str::to_owned))
            .send()
            .await
            .map_err(|err| self.aws("GetObject", &err))?;
        let bytes = out
            .body
            .collect()
            .await
            .map_err(|err| self.aws("GetObject", &err))?
            .into_bytes();
        let Ok(envelope) = serde_json::from_slice::<Envelope<serde_json::Value>>(&bytes) else {
            if version_id.is_some() {
                tracing::warn!(
                    bucket = self.bucket,
                    key = self.key,
                    version_id,
                    "skipping a version that is not a kiln state"
                );
                return Ok(None);
            }
            return Err(self.damaged("the newest version is not a kiln state object"));
        };
        Ok(Some(Head {
            hash: hash_of(&envelope.doc)?,
            lineage: envelope.lineage,
            serial: envelope.serial,
            written_at: envelope.written_at,
            actor: envelope.actor,
            operation: envelope.operation,
            etag,
        }))
    }

    fn damaged(&self, detail: &str) -> Error {
        Error::Damaged {
            what: format!("state {}", self.target()),
            detail: detail.to_owned(),
        }
    }

    fn aws<E: std::error::Error + 'static>(&self, operation: &'static str, err: &E) -> Error {
        crate::error::aws("S3", operation, self.target(), err)
    }

    fn target(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }
}

/// What a prepared PUT stores.
struct Put {
    envelope: Envelope<serde_json::Value>,
    hash: String,
}

impl Put {
    fn current(self, out: &aws_sdk_s3::operation::put_object::PutObjectOutput) -> Current {
        Current {
            lineage: self.envelope.lineage,
            serial: self.envelope.serial,
            written_at: self.envelope.written_at,
            doc: self.envelope.doc,
            etag: out.e_tag().unwrap_or_default().to_owned(),
            version_id: out.version_id().map(str::to_owned),
            hash: self.hash,
        }
    }
}

/// A version's metadata.
#[derive(Debug)]
struct Head {
    lineage: String,
    serial: u64,
    written_at: String,
    actor: String,
    operation: String,
    hash: String,
    etag: String,
}

/// `sha256:<hex>` of the document's JSON as `serde_json` writes a `Value` (object keys
/// sorted), so a document read back hashes as it did when written.
fn hash_of(doc: &serde_json::Value) -> Result<String> {
    let json = serde_json::to_vec(doc).map_err(Error::Encode)?;
    Ok(Digest::of(&json).to_string())
}

/// The HTTP status of a failed request, when the service answered.
fn status<E, R>(err: &aws_sdk_s3::error::SdkError<E, R>) -> Option<u16>
where
    R: HasStatus,
{
    err.raw_response().map(HasStatus::status_code)
}

/// What [`status`] needs from a raw response.
trait HasStatus {
    fn status_code(&self) -> u16;
}

impl HasStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}
