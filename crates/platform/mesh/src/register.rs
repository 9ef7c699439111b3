//! An instance's registration in etcd: a key under a lease, kept alive while the process
//! runs, revoked when it stops; if the process dies, the lease expires and the key goes.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::discovery::Registration as Value;
use crate::etcd::Etcd;
use crate::settings::MeshSettings;

/// A registration checked and ready to start: the etcd client, the key and its value.
pub struct Registrar {
    etcd: Etcd,
    key: String,
    value: String,
    ttl: Duration,
}

impl Registrar {
    /// Prepares to register `service` at `url` under `<etcd_prefix><service>/<host:port>`, if
    /// `mesh.etcd_url` is set; a malformed URL is refused here, before anything is announced.
    pub fn new(settings: &MeshSettings, service: &str, url: &str) -> Result<Option<Self>, String> {
        let Some(etcd_url) = &settings.etcd_url else {
            return Ok(None);
        };
        let base = crate::discovery::base_url(url)
            .ok_or_else(|| format!("cannot register {service}: {url:?} is not http://host:port"))?;
        let authority = base.authority().map_or("", |a| a.as_str()).to_owned();
        let etcd =
            Etcd::new(etcd_url, crate::client(settings, false)).map_err(|e| e.to_string())?;
        let key = format!("{}{service}/{authority}", settings.etcd_prefix);
        let value = serde_json::to_string(&Value {
            url: format!("http://{authority}"),
            weight: 1,
        })
        .map_err(|e| e.to_string())?;
        Ok(Some(Registrar {
            etcd,
            key,
            value,
            ttl: settings.lease_ttl(),
        }))
    }

    /// The key it registers.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Puts the key under a lease and keeps it alive until [`Registration::stop`].
    pub fn start(self) -> Registration {
        let lease = Arc::new(Mutex::new(None));
        let task = tokio::spawn(keep_registered(
            self.etcd.clone(),
            self.key.clone(),
            self.value,
            self.ttl,
            lease.clone(),
        ));
        Registration {
            etcd: self.etcd,
            lease,
            task,
            key: self.key,
        }
    }
}

/// A live registration; [`Registration::stop`] removes it.
pub struct Registration {
    etcd: Etcd,
    lease: Arc<Mutex<Option<i64>>>,
    task: JoinHandle<()>,
    key: String,
}

impl Registration {
    /// The key it holds.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Stops renewing and revokes the lease, so clients drop the instance at once.
    pub async fn stop(mut self) {
        // Stopped before the lease is read: a lease granted and recorded is revoked below; one
        // granted but not yet recorded has no key under it and runs out by itself.
        self.task.abort();
        let _ = (&mut self.task).await;
        if let Some(lease) = *self.lease.lock().await {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.etcd.revoke(lease)).await;
        }
    }
}

/// Grants a lease and puts the key, renews it every third of its TTL, and starts over if it
/// is lost (etcd restarted, or the process stalled past the TTL).
async fn keep_registered(
    etcd: Etcd,
    key: String,
    value: String,
    ttl: Duration,
    current: Arc<Mutex<Option<i64>>>,
) {
    let mut warned = false;
    loop {
        let registered = async {
            let lease = etcd.grant(ttl).await?;
            *current.lock().await = Some(lease);
            etcd.put(&key, &value, lease).await?;
            Ok::<i64, crate::etcd::EtcdError>(lease)
        }
        .await;
        match registered {
            Ok(lease) => {
                tracing::info!(%key, lease, "registered in etcd");
                warned = false;
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    match etcd.keep_alive(lease).await {
                        Ok(left) if left > 0 => {}
                        Ok(_) => {
                            tracing::warn!(%key, "etcd lease expired; registering again");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(%key, error = %e, "cannot renew the etcd lease");
                        }
                    }
                }
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(%key, error = %e, "cannot register in etcd; retrying");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
