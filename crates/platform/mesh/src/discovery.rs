//! Where an upstream's endpoints come from, named by the upstream's spec:
//!
//! | spec | source |
//! |---|---|
//! | `http://h1:p1,http://h2:p2?weight=3` | a static list (weights optional) |
//! | `registry:inventory` | the launcher's registry file (`mesh.registry_file`), re-read every `mesh.refresh_ms` |
//! | `dns:inventory.shop.svc.cluster.local:8080` | every address of the name, resolved every `mesh.refresh_ms` (Kubernetes headless services) |
//! | `etcd:inventory` | the instances registered under `<mesh.etcd_prefix>inventory/` in etcd (`mesh.etcd_url`), watched |
//!
//! Each source runs as a task that replaces the upstream's endpoint set when it changes; the
//! task ends when the upstream is dropped.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::Uri;
use serde::{Deserialize, Serialize};

use crate::etcd::{Change, Etcd};
use crate::settings::MeshSettings;
use crate::upstream::{HttpClient, Upstream};

/// A parsed upstream spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Fixed URLs and weights.
    Static(Vec<(Uri, u32)>),
    /// A service in the launcher's registry file.
    Registry(String),
    /// A DNS name and port.
    Dns(String, u16),
    /// A service registered in etcd.
    Etcd(String),
}

/// A spec that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{spec:?} is not a valid upstream: {reason}")]
pub struct SpecError {
    spec: String,
    reason: String,
}

impl Source {
    /// Parses a spec (see the module's table).
    pub fn parse(spec: &str) -> Result<Source, SpecError> {
        let error = |reason: &str| SpecError {
            spec: spec.to_owned(),
            reason: reason.to_owned(),
        };
        let spec = spec.trim();
        if let Some(name) = spec.strip_prefix("registry:") {
            return service_name(name)
                .map(Source::Registry)
                .ok_or_else(|| error("expected registry:<service>"));
        }
        if let Some(name) = spec.strip_prefix("etcd:") {
            return service_name(name)
                .map(Source::Etcd)
                .ok_or_else(|| error("expected etcd:<service>"));
        }
        if let Some(target) = spec.strip_prefix("dns:") {
            let target = target.trim_start_matches('/');
            let (host, port) = target
                .rsplit_once(':')
                .ok_or_else(|| error("expected dns:<name>:<port>"))?;
            let port = port
                .parse()
                .map_err(|_| error("the port is not a number"))?;
            if host.is_empty() {
                return Err(error("the name is empty"));
            }
            return Ok(Source::Dns(host.to_owned(), port));
        }
        let mut endpoints = Vec::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (url, weight) = match item.split_once("?weight=") {
                Some((url, w)) => (
                    url,
                    w.parse::<u32>()
                        .map_err(|_| error("a weight is not a positive number"))?
                        .max(1),
                ),
                None => (item, 1),
            };
            endpoints.push((
                base_url(url).ok_or_else(|| error("expected http://host:port"))?,
                weight,
            ));
        }
        if endpoints.is_empty() {
            return Err(error("no endpoint given"));
        }
        Ok(Source::Static(endpoints))
    }
}

fn service_name(name: &str) -> Option<String> {
    let name = name.trim_start_matches('/');
    (!name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
    .then(|| name.to_owned())
}

/// `http://host:port`, without path.
pub(crate) fn base_url(url: &str) -> Option<Uri> {
    let uri: Uri = url.trim_end_matches('/').parse().ok()?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return None;
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return None;
    }
    Some(uri)
}

/// The launcher's registry file: the live instances of every service.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Registry {
    /// Instances per service.
    pub services: BTreeMap<String, Vec<RegistryEntry>>,
}

/// One instance in the registry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegistryEntry {
    /// Its name, e.g. `inventory-2`.
    pub instance: String,
    /// Its URL.
    pub url: String,
}

impl Registry {
    /// Reads the file.
    pub fn read(path: &Path) -> std::io::Result<Registry> {
        let bytes = std::fs::read(path)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// Writes the file atomically (readers never see half of it).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, path)
    }
}

/// What an instance writes into etcd.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Registration {
    pub url: String,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// Starts the task that keeps `upstream`'s endpoints current.
pub(crate) fn spawn(
    source: Source,
    upstream: &Arc<Upstream>,
    settings: Arc<MeshSettings>,
    client: HttpClient,
) -> Result<(), SpecError> {
    let weak = Arc::downgrade(upstream);
    match source {
        Source::Static(endpoints) => upstream.set_endpoints(endpoints),
        Source::Registry(service) => {
            let path = settings.registry_file.clone().ok_or_else(|| SpecError {
                spec: format!("registry:{service}"),
                reason: "mesh.registry_file (SHOPMESH_MESH__REGISTRY_FILE) is unset".to_owned(),
            })?;
            // Read once now, so the first call has endpoints; then whenever the file changes
            // (checked often: a stat is cheap, and the launcher rewrites it as instances come
            // and go).
            upstream.set_endpoints(from_registry(&path, &service));
            let seen = std::sync::Mutex::new(modified(&path));
            tokio::spawn(poll(
                weak,
                REGISTRY_CHECK.min(settings.refresh()),
                move || {
                    let now = modified(&path);
                    let changed = match seen.lock() {
                        Ok(mut seen) => std::mem::replace(&mut *seen, now) != now,
                        Err(_) => true,
                    };
                    let found = changed.then(|| from_registry(&path, &service));
                    async move { found }
                },
            ));
        }
        Source::Dns(host, port) => {
            tokio::spawn(poll(weak, settings.refresh(), move || {
                let host = host.clone();
                async move { resolve(&host, port).await }
            }));
        }
        Source::Etcd(service) => {
            let url = settings.etcd_url.clone().ok_or_else(|| SpecError {
                spec: format!("etcd:{service}"),
                reason: "mesh.etcd_url (SHOPMESH_MESH__ETCD_URL) is unset".to_owned(),
            })?;
            let etcd = Etcd::new(&url, client).map_err(|e| SpecError {
                spec: format!("etcd:{service}"),
                reason: e.to_string(),
            })?;
            let prefix = format!("{}{service}/", settings.etcd_prefix);
            tokio::spawn(watch_etcd(weak, etcd, prefix, settings.refresh()));
        }
    }
    Ok(())
}

/// How often the registry file is checked for changes.
const REGISTRY_CHECK: Duration = Duration::from_millis(200);

/// The file's modification time and length, to tell a rewrite.
fn modified(path: &Path) -> Option<(std::time::SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn from_registry(path: &Path, service: &str) -> Vec<(Uri, u32)> {
    match Registry::read(path) {
        Ok(registry) => registry
            .services
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|entry| base_url(&entry.url).map(|u| (u, 1)))
            .collect(),
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "cannot read the registry");
            Vec::new()
        }
    }
}

async fn resolve(host: &str, port: u16) -> Option<Vec<(Uri, u32)>> {
    match tokio::net::lookup_host((host, port)).await {
        Ok(addrs) => {
            let mut found: Vec<(Uri, u32)> = addrs
                .filter_map(|addr| base_url(&format!("http://{addr}")).map(|u| (u, 1)))
                .collect();
            found.sort_by_key(|(uri, _)| uri.to_string());
            Some(found)
        }
        Err(e) => {
            // Keep the last answer: a resolver hiccup must not empty the upstream.
            tracing::warn!(host, error = %e, "cannot resolve");
            None
        }
    }
}

/// Re-runs `find` every `every`, replacing the endpoints when it finds some answer.
async fn poll<F, Fut>(upstream: Weak<Upstream>, every: Duration, find: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<Vec<(Uri, u32)>>>,
{
    loop {
        let found = find().await;
        let Some(upstream) = upstream.upgrade() else {
            return;
        };
        if let Some(found) = found {
            upstream.set_endpoints(found);
        }
        drop(upstream);
        tokio::time::sleep(every).await;
    }
}

/// Lists the prefix, then follows it with a watch; starts over when the watch ends.
async fn watch_etcd(upstream: Weak<Upstream>, etcd: Etcd, prefix: String, retry: Duration) {
    let mut warned = false;
    loop {
        if upstream.strong_count() == 0 {
            return;
        }
        let (revision, kvs) = match etcd.list(&prefix).await {
            Ok(listed) => listed,
            Err(e) => {
                if !warned {
                    tracing::warn!(%prefix, error = %e, "cannot list instances in etcd");
                    warned = true;
                }
                tokio::time::sleep(retry).await;
                continue;
            }
        };
        warned = false;
        let mut instances: BTreeMap<String, (Uri, u32)> = BTreeMap::new();
        for kv in kvs {
            if let Some(endpoint) = registration(&kv.value) {
                instances.insert(kv.key, endpoint);
            }
        }
        let publish = |instances: &BTreeMap<String, (Uri, u32)>| {
            if let Some(upstream) = upstream.upgrade() {
                upstream.set_endpoints(instances.values().cloned().collect());
            }
        };
        publish(&instances);
        let result = etcd
            .watch(&prefix, revision + 1, |changes| {
                for change in changes {
                    match change {
                        Change::Put(kv) => {
                            if let Some(endpoint) = registration(&kv.value) {
                                instances.insert(kv.key, endpoint);
                            }
                        }
                        Change::Delete(key) => {
                            instances.remove(&key);
                        }
                    }
                }
                publish(&instances);
            })
            .await;
        if let Err(e) = result {
            tracing::debug!(%prefix, error = %e, "etcd watch ended");
        }
        tokio::time::sleep(retry).await;
    }
}

fn registration(value: &str) -> Option<(Uri, u32)> {
    let registration: Registration = serde_json::from_str(value).ok()?;
    Some((base_url(&registration.url)?, registration.weight.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_into_their_sources() {
        assert_eq!(
            Source::parse("http://127.0.0.1:1, http://127.0.0.1:2/?weight=3").ok(),
            Some(Source::Static(vec![
                ("http://127.0.0.1:1".parse().expect("uri"), 1),
                ("http://127.0.0.1:2".parse().expect("uri"), 3),
            ]))
        );
        assert_eq!(
            Source::parse("registry:inventory").ok(),
            Some(Source::Registry("inventory".to_owned()))
        );
        assert_eq!(
            Source::parse("etcd:inventory").ok(),
            Some(Source::Etcd("inventory".to_owned()))
        );
        assert_eq!(
            Source::parse("dns:inventory.shop.svc:8080").ok(),
            Some(Source::Dns("inventory.shop.svc".to_owned(), 8080))
        );
        for bad in [
            "",
            "ftp://x:1",
            "http://x:1/path",
            "dns:nameonly",
            "registry:",
            "etcd:a/b",
            "http://x:1?weight=z",
        ] {
            assert!(Source::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn the_registry_round_trips_through_its_file() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("registry.json");
        let mut registry = Registry::default();
        registry.services.insert(
            "inventory".to_owned(),
            vec![RegistryEntry {
                instance: "inventory-1".to_owned(),
                url: "http://127.0.0.1:2001".to_owned(),
            }],
        );
        registry.write(&path).expect("written");
        assert_eq!(Registry::read(&path).expect("read"), registry);
        assert_eq!(
            from_registry(&path, "inventory"),
            vec![("http://127.0.0.1:2001".parse().expect("uri"), 1)]
        );
        assert!(from_registry(&path, "catalog").is_empty());
    }
}
