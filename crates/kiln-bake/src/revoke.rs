//! Image revocation: an image that must no longer be deployed, and every image built on it.
//!
//! A revocation is a record in the store (`kiln/revocations/<hex>.json`) naming the image's
//! digest, why, who, and from when it applies (`at`, which may be in the future). An image is
//! revoked when it or any image in its ancestry (its `parent`, the parent's parent, …) has a
//! revocation in effect: a base image found to be vulnerable revokes everything baked on it.
//! Deploys and rollbacks to a revoked image are refused; instances already running are left to
//! the operator (replacing them is a deploy of another image).

use std::collections::BTreeMap;
use std::time::SystemTime;

use kiln_core::Digest;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::record::ImageRecord;
use crate::store::Store;

/// A revocation of one image (and so of its descendants).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The image revoked.
    pub digest: Digest,
    /// Its name when revoked, for people.
    pub name: String,
    /// Why.
    pub reason: String,
    /// From when it applies (RFC 3339).
    pub at: String,
    /// Who revoked it (`user@host`).
    pub by: String,
    /// When it was recorded (RFC 3339).
    pub recorded_at: String,
}

impl Revocation {
    /// Whether it applies at `now`.
    pub fn in_effect(&self, now: SystemTime) -> bool {
        humantime::parse_rfc3339(&self.at).is_ok_and(|at| at <= now)
    }
}

/// Why an image may not be deployed: the revocation in effect and the image it names (the
/// image itself or one of its ancestors).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    /// The revocation.
    pub revocation: Revocation,
    /// Whether it names an ancestor rather than the image itself.
    pub inherited: bool,
}

impl std::fmt::Display for Revoked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = &self.revocation;
        if self.inherited {
            write!(
                f,
                "built on {} ({}), revoked since {} by {}: {}",
                r.name, r.digest, r.at, r.by, r.reason
            )
        } else {
            write!(f, "revoked since {} by {}: {}", r.at, r.by, r.reason)
        }
    }
}

impl Store {
    /// Records a revocation of `record`, in effect from `at` (RFC 3339).
    pub fn revoke(
        &self,
        record: &ImageRecord,
        reason: &str,
        at: &str,
        by: &str,
        now: SystemTime,
    ) -> Result<Revocation> {
        humantime::parse_rfc3339(at).map_err(|e| Error::Invalid {
            what: format!("revocation time {at:?}"),
            reason: format!("expected an RFC 3339 time such as 2026-11-29T12:00:00Z ({e})"),
        })?;
        let revocation = Revocation {
            digest: record.digest.clone(),
            name: record.name.clone(),
            reason: reason.to_owned(),
            at: at.to_owned(),
            by: by.to_owned(),
            recorded_at: humantime::format_rfc3339_seconds(now).to_string(),
        };
        let dir = self.root().join("kiln").join("revocations");
        std::fs::create_dir_all(&dir).map_err(Error::io("create store directory", &dir))?;
        self.write_json(
            &dir.join(format!("{}.json", record.digest.hex())),
            &revocation,
        )?;
        Ok(revocation)
    }

    /// Every revocation, by digest.
    pub fn revocations(&self) -> Result<BTreeMap<Digest, Revocation>> {
        let dir = self.root().join("kiln").join("revocations");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(Error::io("read", &dir)(e)),
        };
        let mut out = BTreeMap::new();
        for entry in entries {
            let path = entry.map_err(Error::io("read", &dir))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let bytes = std::fs::read(&path).map_err(Error::io("read", &path))?;
            let r: Revocation = serde_json::from_slice(&bytes).map_err(|source| Error::Json {
                what: path.display().to_string(),
                source,
            })?;
            out.insert(r.digest.clone(), r);
        }
        Ok(out)
    }

    /// The images `record` is built on, nearest first (its `parent`, the parent's parent, …),
    /// as far as the store has their records. A hand-edited record could loop: the walk stops
    /// at a digest seen before, and after 64 levels.
    pub fn ancestry(&self, record: &ImageRecord) -> Result<Vec<ImageRecord>> {
        let mut out: Vec<ImageRecord> = Vec::new();
        let mut parent = record.parent.clone();
        while let Some(digest) = parent.take() {
            if out.len() >= 64 || digest == record.digest || out.iter().any(|r| r.digest == digest)
            {
                break;
            }
            let Some(rec) = self.image(&digest)? else {
                break;
            };
            parent = rec.parent.clone();
            out.push(rec);
        }
        Ok(out)
    }

    /// The revocation in effect at `now` for `record`: its own, or the nearest ancestor's.
    pub fn revoked(&self, record: &ImageRecord, now: SystemTime) -> Result<Option<Revoked>> {
        let revocations = self.revocations()?;
        if revocations.is_empty() {
            return Ok(None);
        }
        let ancestry = std::iter::once(record.clone()).chain(self.ancestry(record)?);
        for (depth, rec) in ancestry.enumerate() {
            if let Some(r) = revocations.get(&rec.digest)
                && r.in_effect(now)
            {
                return Ok(Some(Revoked {
                    revocation: r.clone(),
                    inherited: depth > 0,
                }));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::test_support::put;

    fn new_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        (dir, store)
    }

    #[test]
    fn a_revoked_base_revokes_what_is_built_on_it_from_its_time_on() {
        let (_dir, store) = new_store();
        let base = put(&store, "base", "2026-01-01T00:00:00Z", b"base");
        let mut web = put(&store, "web", "2026-01-02T00:00:00Z", b"web");
        web.parent = Some(base.digest.clone());
        store.put_image(&web).unwrap();
        let other = put(&store, "other", "2026-01-02T00:00:00Z", b"other");

        let now = humantime::parse_rfc3339("2026-06-01T00:00:00Z").unwrap();
        assert_eq!(store.revoked(&web, now).unwrap(), None);
        store
            .revoke(
                &base,
                "CVE-2026-0001 in openssl",
                "2026-06-01T00:00:00Z",
                "alice@host",
                now,
            )
            .unwrap();

        let own = store.revoked(&base, now).unwrap().unwrap();
        assert!(!own.inherited);
        let child = store.revoked(&web, now).unwrap().unwrap();
        assert!(child.inherited);
        assert_eq!(child.revocation.digest, base.digest);
        assert!(child.to_string().contains("CVE-2026-0001"), "{child}");
        assert_eq!(store.revoked(&other, now).unwrap(), None);
        // Not yet in effect a second earlier.
        let before = now - Duration::from_secs(1);
        assert_eq!(store.revoked(&web, before).unwrap(), None);
    }

    #[test]
    fn a_revocation_time_must_be_rfc3339() {
        let (_dir, store) = new_store();
        let base = put(&store, "base", "2026-01-01T00:00:00Z", b"base");
        let err = store
            .revoke(&base, "r", "tomorrow", "a@h", SystemTime::UNIX_EPOCH)
            .unwrap_err();
        assert!(err.to_string().contains("RFC 3339"), "{err}");
    }
}
