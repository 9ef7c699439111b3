//! A small etcd v3 client over etcd's JSON gateway (`/v3/...` on the client URL).
//!
//! Why not `etcd-client`: it compiles etcd's protos with `protoc` at build time, and the
//! README's two commands must work on a machine without one. The JSON gateway is part of every
//! etcd v3 server and offers what discovery needs (leases, put, range, watch) as plain
//! HTTP/1.1 requests.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::{Bytes, BytesMut};
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::upstream::HttpClient;

/// How long a unary request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// What went wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No connection, or it broke.
    #[error("etcd is unreachable: {0}")]
    Unreachable(String),
    /// etcd answered with an error.
    #[error("etcd refused: {0}")]
    Refused(String),
    /// The answer could not be read.
    #[error("unexpected answer from etcd: {0}")]
    Malformed(String),
}

/// A key and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value.
    pub value: String,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Set (created or updated).
    Put(KeyValue),
    /// Removed (deleted, or its lease expired).
    Delete(String),
}

/// The client.
#[derive(Clone)]
pub struct Etcd {
    base: String,
    client: HttpClient,
}

/// etcd's JSON renders 64-bit integers as strings.
fn int(value: &Value) -> Option<i64> {
    match value {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn decode(value: &Value) -> Option<String> {
    let bytes = B64.decode(value.as_str()?).ok()?;
    String::from_utf8(bytes).ok()
}

/// The key just past every key starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Etcd {
    /// A client of the etcd at `url` (e.g. `http://127.0.0.1:2379`).
    pub fn new(url: &str, client: HttpClient) -> Result<Self, EtcdError> {
        let base = url.trim_end_matches('/').to_owned();
        base.parse::<Uri>()
            .map_err(|e| EtcdError::Malformed(format!("{url:?} is not a URL: {e}")))?;
        Ok(Etcd { base, client })
    }

    async fn post(&self, path: &str, body: Value) -> Result<Value, EtcdError> {
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.send(path, body))
            .await
            .map_err(|_| EtcdError::Unreachable("timed out".to_owned()))??;
        let status = response.status();
        let bytes = tokio::time::timeout(REQUEST_TIMEOUT, response.into_body().collect())
            .await
            .map_err(|_| EtcdError::Unreachable("timed out".to_owned()))?
            .map_err(|e| EtcdError::Unreachable(e.to_string()))?
            .to_bytes();
        let value: Value =
            serde_json::from_slice(&bytes).map_err(|e| EtcdError::Malformed(e.to_string()))?;
        if !status.is_success() || value.get("error").is_some() {
            return Err(EtcdError::Refused(value.to_string()));
        }
        Ok(value)
    }

    async fn send(
        &self,
        path: &str,
        body: Value,
    ) -> Result<http::Response<hyper::body::Incoming>, EtcdError> {
        let request = Request::post(format!("{}{path}", self.base))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| EtcdError::Malformed(e.to_string()))?;
        self.client
            .request(request)
            .await
            .map_err(|e| EtcdError::Unreachable(e.to_string()))
    }

    /// Grants a lease of `ttl`; returns its id.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let answer = self
            .post("/v3/lease/grant", json!({"TTL": ttl.as_secs().max(1)}))
            .await?;
        answer
            .get("ID")
            .and_then(int)
            .ok_or_else(|| EtcdError::Malformed(answer.to_string()))
    }

    /// Renews a lease; returns its remaining TTL in seconds (0: it had expired).
    pub async fn keep_alive(&self, lease: i64) -> Result<i64, EtcdError> {
        let answer = self
            .post("/v3/lease/keepalive", json!({"ID": lease.to_string()}))
            .await?;
        let result = answer.get("result").unwrap_or(&answer);
        Ok(result.get("TTL").and_then(int).unwrap_or(0))
    }

    /// Revokes a lease, deleting its keys.
    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        self.post("/v3/lease/revoke", json!({"ID": lease.to_string()}))
            .await
            .map(drop)
    }

    /// Sets `key` to `value`, attached to `lease`.
    pub async fn put(&self, key: &str, value: &str, lease: i64) -> Result<(), EtcdError> {
        self.post(
            "/v3/kv/put",
            json!({"key": B64.encode(key), "value": B64.encode(value), "lease": lease.to_string()}),
        )
        .await
        .map(drop)
    }

    /// Every key under `prefix`, and the store's revision.
    pub async fn list(&self, prefix: &str) -> Result<(i64, Vec<KeyValue>), EtcdError> {
        let answer = self
            .post(
                "/v3/kv/range",
                json!({"key": B64.encode(prefix), "range_end": B64.encode(prefix_end(prefix))}),
            )
            .await?;
        let revision = answer
            .pointer("/header/revision")
            .and_then(int)
            .ok_or_else(|| EtcdError::Malformed(answer.to_string()))?;
        let kvs = answer
            .get("kvs")
            .and_then(Value::as_array)
            .map(|kvs| {
                kvs.iter()
                    .filter_map(|kv| {
                        Some(KeyValue {
                            key: decode(kv.get("key")?)?,
                            value: kv.get("value").and_then(decode).unwrap_or_default(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok((revision, kvs))
    }

    /// Watches `prefix` from `revision` on; calls `on_changes` with each batch until the
    /// stream ends or fails.
    pub async fn watch(
        &self,
        prefix: &str,
        revision: i64,
        mut on_changes: impl FnMut(Vec<Change>),
    ) -> Result<(), EtcdError> {
        let request = json!({"create_request": {
            "key": B64.encode(prefix),
            "range_end": B64.encode(prefix_end(prefix)),
            "start_revision": revision.to_string(),
        }});
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.send("/v3/watch", request))
            .await
            .map_err(|_| EtcdError::Unreachable("timed out".to_owned()))??;
        if !response.status().is_success() {
            return Err(EtcdError::Refused(format!("watch: {}", response.status())));
        }
        let mut body = response.into_body();
        let mut buffer = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| EtcdError::Unreachable(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buffer.extend_from_slice(&data);
            // The gateway streams one JSON object per message.
            let mut consumed = 0;
            let mut stream = serde_json::Deserializer::from_slice(&buffer).into_iter::<Value>();
            while let Some(item) = stream.next() {
                match item {
                    Ok(message) => {
                        consumed = stream.byte_offset();
                        if let Some(error) = message.get("error") {
                            return Err(EtcdError::Refused(error.to_string()));
                        }
                        let changes = parse_events(&message);
                        if !changes.is_empty() {
                            on_changes(changes);
                        }
                    }
                    Err(e) if e.is_eof() => break,
                    Err(e) => return Err(EtcdError::Malformed(e.to_string())),
                }
            }
            let _ = buffer.split_to(consumed);
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct Event {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    kv: Value,
}

fn parse_events(message: &Value) -> Vec<Change> {
    let Some(events) = message.pointer("/result/events").cloned() else {
        return Vec::new();
    };
    let events: Vec<Event> = serde_json::from_value(events).unwrap_or_default();
    events
        .into_iter()
        .filter_map(|event| {
            let key = decode(event.kv.get("key")?)?;
            Some(match event.kind.as_deref() {
                Some("DELETE") => Change::Delete(key),
                _ => Change::Put(KeyValue {
                    key,
                    value: event.kv.get("value").and_then(decode).unwrap_or_default(),
                }),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_end_is_the_next_key_after_every_key_with_the_prefix() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }

    #[test]
    fn watch_events_are_read_from_the_gateway_json() {
        let message = json!({"result": {"header": {"revision": "9"}, "events": [
            {"kv": {"key": B64.encode("/s/inventory/a"), "value": B64.encode("{}")}},
            {"type": "DELETE", "kv": {"key": B64.encode("/s/inventory/b")}},
        ]}});
        assert_eq!(
            parse_events(&message),
            vec![
                Change::Put(KeyValue {
                    key: "/s/inventory/a".to_owned(),
                    value: "{}".to_owned()
                }),
                Change::Delete("/s/inventory/b".to_owned()),
            ]
        );
    }
}
