//! The event log: an append-only record of what happened, read in order by id.

use std::time::SystemTime;

use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};

use crate::time::rfc3339;
use crate::{Error, Result, StateStore};

/// An event to append.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    /// The service it concerns, if any.
    pub service: Option<String>,
    /// A dotted, stable kind for machines, e.g. `rollout.step`.
    pub kind: String,
    /// One line for people.
    pub message: String,
    /// Details; `null` when there are none.
    pub data: serde_json::Value,
}

/// A stored event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the log: increasing, never reused.
    pub id: u64,
    /// When it was appended (RFC 3339).
    pub time: String,
    /// The service it concerns, if any.
    pub service: Option<String>,
    /// A dotted, stable kind for machines.
    pub kind: String,
    /// One line for people.
    pub message: String,
    /// Details.
    pub data: serde_json::Value,
}

impl StateStore {
    /// Appends `events` in one transaction: all of them or none.
    pub fn append_events(&self, events: &[NewEvent], now: SystemTime) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let tx = self.immediate()?;
        insert(&tx, events, now)?;
        tx.commit()?;
        Ok(())
    }

    /// Up to `limit` events with ids above `after_id`, oldest first. Start with `after_id = 0`
    /// and pass the last id seen to page through the log.
    pub fn events(&self, after_id: u64, limit: usize) -> Result<Vec<Event>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, time, service, kind, message, data FROM events
             WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let mut rows = stmt.query(params![after_id, limit])?;
        let mut events = Vec::new();
        while let Some(row) = rows.next()? {
            let id: u64 = row.get(0)?;
            let data: String = row.get(5)?;
            events.push(Event {
                id,
                time: row.get(1)?,
                service: row.get(2)?,
                kind: row.get(3)?,
                message: row.get(4)?,
                data: serde_json::from_str(&data).map_err(|source| Error::Decode {
                    what: format!("event {id}"),
                    source,
                })?,
            });
        }
        Ok(events)
    }
}

/// Appends `events` inside the caller's transaction.
pub(crate) fn insert(conn: &Connection, events: &[NewEvent], now: SystemTime) -> Result<()> {
    let time = rfc3339(now);
    let mut stmt = conn.prepare_cached(
        "INSERT INTO events (time, service, kind, message, data) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for event in events {
        // Serialising a `Value` to a string cannot fail.
        let data = event.data.to_string();
        stmt.execute(params![
            time,
            event.service,
            event.kind,
            event.message,
            data
        ])?;
    }
    Ok(())
}
