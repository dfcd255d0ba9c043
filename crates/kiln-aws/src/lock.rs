//! The state lock: one DynamoDB item per state, with a lease and a fencing token.
//!
//! The item (partition key `LockID`, a string) holds `Token` (a number that only grows) and,
//! while someone holds the lock, the holder: `Id` (the lease's uuid), `Operation`, `Who`,
//! `Info`, `Created` (RFC 3339), `Expires` (milliseconds since the epoch) and `ExpiresAt`
//! (RFC 3339). Releasing removes the holder's attributes but keeps the item and its token, so a
//! lock taken later gets a higher token than every lease before it.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use aws_config::SdkConfig;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue, ReturnValuesOnConditionCheckFailure};

use crate::time::{add, from_millis, rfc3339, unix_millis};
use crate::{Error, Result};

type Item = HashMap<String, AttributeValue>;

/// The holder's attributes, removed on release.
const HOLDER: [&str; 7] = [
    "Id",
    "Operation",
    "Who",
    "Info",
    "Created",
    "Expires",
    "ExpiresAt",
];

/// What a caller says about itself when it takes the lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockRequest {
    /// The command holding it, e.g. `apply`.
    pub operation: String,
    /// The person, `user@host`.
    pub who: String,
    /// Free text shown to whoever finds the state locked.
    pub info: String,
}

/// A held lock, from the holder's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The lease's uuid; renew, release and `force-unlock` name it.
    pub id: String,
    /// The fencing token: higher than every earlier lease's on this lock.
    pub token: u64,
    /// When the lease runs out unless renewed; after that anyone may take the lock over.
    pub expires: SystemTime,
}

/// A held lock, as others see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockInfo {
    /// The lease's uuid; `force-unlock` must name it.
    pub id: String,
    /// The lease's fencing token.
    pub token: u64,
    /// The command holding it.
    pub operation: String,
    /// The person, `user@host`.
    pub who: String,
    /// Free text from the holder.
    pub info: String,
    /// When it was taken (RFC 3339).
    pub created: String,
    /// When its lease runs out (RFC 3339).
    pub expires: String,
    /// The same, as a time.
    pub expires_at: SystemTime,
}

/// The lock of one state, in a DynamoDB table whose partition key is the string `LockID`.
#[derive(Debug, Clone)]
pub struct DynamoLock {
    client: Client,
    table: String,
    lock_id: String,
}

impl DynamoLock {
    /// The lock named `lock_id` (for a state in S3, `<bucket>/<key>`) in `table`.
    pub fn new(conf: &SdkConfig, table: impl Into<String>, lock_id: impl Into<String>) -> Self {
        Self {
            client: Client::new(conf),
            table: table.into(),
            lock_id: lock_id.into(),
        }
    }

    /// The table.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The item's `LockID`.
    pub fn lock_id(&self) -> &str {
        &self.lock_id
    }

    /// Takes the lock for `lease`, in one conditional write: it succeeds when nobody holds the
    /// lock or the holder's lease ran out before `now` (a takeover), and gives the new lease
    /// the previous token + 1. Fails with [`Error::Locked`] naming the holder otherwise.
    pub async fn acquire(
        &self,
        req: &LockRequest,
        lease: Duration,
        now: SystemTime,
    ) -> Result<Lease> {
        let id = uuid::Uuid::new_v4().to_string();
        let expires = add(now, lease);
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("LockID", s(&self.lock_id))
            .update_expression(
                "SET #token = if_not_exists(#token, :zero) + :one, #id = :id, #op = :op, \
                 #who = :who, #info = :info, #created = :created, #expires = :expires, \
                 #expires_at = :expires_at",
            )
            .condition_expression("attribute_not_exists(#id) OR #expires < :now")
            .expression_attribute_names("#token", "Token")
            .expression_attribute_names("#id", "Id")
            .expression_attribute_names("#op", "Operation")
            .expression_attribute_names("#who", "Who")
            .expression_attribute_names("#info", "Info")
            .expression_attribute_names("#created", "Created")
            .expression_attribute_names("#expires", "Expires")
            .expression_attribute_names("#expires_at", "ExpiresAt")
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":id", s(&id))
            .expression_attribute_values(":op", s(&req.operation))
            .expression_attribute_values(":who", s(&req.who))
            .expression_attribute_values(":info", s(&req.info))
            .expression_attribute_values(":created", s(&rfc3339(now)))
            .expression_attribute_values(":expires", n(unix_millis(expires)))
            .expression_attribute_values(":expires_at", s(&rfc3339(expires)))
            .expression_attribute_values(":now", n(unix_millis(now)))
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match out {
            Ok(out) => {
                let item = out.attributes.unwrap_or_default();
                let token = number(&item, "Token").ok_or_else(|| self.damaged("no Token"))?;
                tracing::debug!(lock = self.lock_id, lease = id, token, "state lock taken");
                Ok(Lease { id, token, expires })
            }
            Err(err) => {
                if let Some(UpdateItemError::ConditionalCheckFailedException(failed)) =
                    err.as_service_error()
                {
                    let holder = match failed.item() {
                        Some(item) => holder(item),
                        None => self.info().await?,
                    };
                    // The holder can have released in between; say so rather than guess.
                    let info = holder.ok_or_else(|| self.contended())?;
                    return Err(Error::Locked(Box::new(info)));
                }
                Err(self.aws("UpdateItem", &err))
            }
        }
    }

    /// Extends `lease` to `now + duration`, provided it still holds the lock; fails with
    /// [`Error::LockLost`] otherwise (released, force-unlocked or taken over): the caller must
    /// stop, it no longer owns the state.
    pub async fn renew(&self, lease: &Lease, duration: Duration, now: SystemTime) -> Result<Lease> {
        let expires = add(now, duration);
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("LockID", s(&self.lock_id))
            .update_expression("SET #expires = :expires, #expires_at = :expires_at")
            .condition_expression("#id = :id")
            .expression_attribute_names("#id", "Id")
            .expression_attribute_names("#expires", "Expires")
            .expression_attribute_names("#expires_at", "ExpiresAt")
            .expression_attribute_values(":id", s(&lease.id))
            .expression_attribute_values(":expires", n(unix_millis(expires)))
            .expression_attribute_values(":expires_at", s(&rfc3339(expires)))
            .send()
            .await;
        match out {
            Ok(_) => Ok(Lease {
                expires,
                ..lease.clone()
            }),
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Err(self.lost(&lease.id).await)
            }
            Err(err) => Err(self.aws("UpdateItem", &err)),
        }
    }

    /// Releases `lease`, provided it still holds the lock ([`Error::LockLost`] otherwise). The
    /// item and its token stay.
    pub async fn release(&self, lease: &Lease) -> Result<()> {
        match self.clear(&lease.id).await? {
            true => Ok(()),
            false => Err(self.lost(&lease.id).await),
        }
    }

    /// Who holds the lock now (consistent read), expired or not; `None` when nobody does.
    pub async fn info(&self) -> Result<Option<LockInfo>> {
        Ok(self.item().await?.as_ref().and_then(holder))
    }

    /// The lock's current fencing token (consistent read), and the lease holding it: `None`
    /// when the lock was never taken.
    pub async fn token(&self) -> Result<Option<(u64, Option<String>)>> {
        Ok(self.item().await?.and_then(|item| {
            let token = number(&item, "Token")?;
            Some((token, string(&item, "Id")))
        }))
    }

    /// Removes the lock whatever its holder, provided `id` names its lease exactly: that
    /// proves the caller looked at the lock it removes. Returns what was removed.
    pub async fn force_release(&self, id: &str) -> Result<LockInfo> {
        let Some(current) = self.info().await? else {
            return Err(Error::NotLocked {
                given: id.to_owned(),
            });
        };
        if current.id != id {
            return Err(Error::LockIdMismatch {
                given: id.to_owned(),
                current: current.id,
            });
        }
        if !self.clear(id).await? {
            // Released or taken over between the read and the write.
            return Err(match self.info().await? {
                Some(now) => Error::LockIdMismatch {
                    given: id.to_owned(),
                    current: now.id,
                },
                None => Error::NotLocked {
                    given: id.to_owned(),
                },
            });
        }
        tracing::warn!(
            lock = self.lock_id,
            lease = id,
            operation = current.operation,
            who = current.who,
            "state lock forcibly removed"
        );
        Ok(current)
    }

    /// Removes the holder's attributes if lease `id` holds the lock; false if it does not.
    async fn clear(&self, id: &str) -> Result<bool> {
        let mut remove = String::from("REMOVE ");
        let mut names = HashMap::new();
        for (i, attr) in HOLDER.iter().enumerate() {
            if i > 0 {
                remove.push_str(", ");
            }
            remove.push_str(&format!("#a{i}"));
            names.insert(format!("#a{i}"), (*attr).to_owned());
        }
        names.insert("#id".to_owned(), "Id".to_owned());
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("LockID", s(&self.lock_id))
            .update_expression(remove)
            .condition_expression("#id = :id")
            .set_expression_attribute_names(Some(names))
            .expression_attribute_values(":id", s(id))
            .send()
            .await;
        match out {
            Ok(_) => Ok(true),
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(err) => Err(self.aws("UpdateItem", &err)),
        }
    }

    /// The item, read consistently.
    async fn item(&self) -> Result<Option<Item>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("LockID", s(&self.lock_id))
            .consistent_read(true)
            .send()
            .await
            .map_err(|err| self.aws("GetItem", &err))?;
        Ok(out.item)
    }

    /// [`Error::LockLost`] for `lease_id`, naming the current holder when it can be read.
    async fn lost(&self, lease_id: &str) -> Error {
        let current = self.info().await.ok().flatten().map(|info| info.id);
        Error::LockLost {
            lease_id: lease_id.to_owned(),
            current,
        }
    }

    fn contended(&self) -> Error {
        Error::Aws {
            service: "DynamoDB",
            operation: "UpdateItem",
            target: self.target(),
            detail: "the lock changed hands while it was being taken".to_owned(),
        }
    }

    fn damaged(&self, detail: &str) -> Error {
        Error::Damaged {
            what: format!("lock item {}", self.target()),
            detail: detail.to_owned(),
        }
    }

    fn aws<E: std::error::Error + 'static>(&self, operation: &'static str, err: &E) -> Error {
        crate::error::aws("DynamoDB", operation, self.target(), err)
    }

    fn target(&self) -> String {
        format!("table {} item {}", self.table, self.lock_id)
    }
}

/// The holder recorded in `item`, if any.
fn holder(item: &Item) -> Option<LockInfo> {
    let expires_ms = number(item, "Expires")?;
    Some(LockInfo {
        id: string(item, "Id")?,
        token: number(item, "Token").unwrap_or(0),
        operation: string(item, "Operation").unwrap_or_default(),
        who: string(item, "Who").unwrap_or_default(),
        info: string(item, "Info").unwrap_or_default(),
        created: string(item, "Created").unwrap_or_default(),
        expires: string(item, "ExpiresAt").unwrap_or_else(|| rfc3339(from_millis(expires_ms))),
        expires_at: from_millis(expires_ms),
    })
}

fn s(text: &str) -> AttributeValue {
    AttributeValue::S(text.to_owned())
}

fn n(number: u64) -> AttributeValue {
    AttributeValue::N(number.to_string())
}

fn string(item: &Item, name: &str) -> Option<String> {
    item.get(name)?.as_s().ok().cloned()
}

fn number(item: &Item, name: &str) -> Option<u64> {
    item.get(name)?.as_n().ok()?.parse().ok()
}
