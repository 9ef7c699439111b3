//! The notifications service's configuration: the common sections plus `[notifications]`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

shopmesh_service::service_config!(notifications: NotificationsSettings);

/// `[notifications]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotificationsSettings {
    /// The users service (an upstream spec): `user.registered`.
    pub users_url: String,
    /// The orders service (an upstream spec): `order.*`.
    pub orders_url: String,
    /// Also write each message as `<mail_dir>/<event id>.eml` (relative: under `data_dir`) when
    /// no SMTP server is configured [default: unset, messages are kept in the database only and read through
    /// `GET /api/v1/admin/notifications/{event_id}/message`].
    pub mail_dir: Option<PathBuf>,
    /// Send through this SMTP server instead, e.g. `smtp://mail.internal:25` or
    /// `smtp://user:password@relay:587` (plain SMTP to a relay; no TLS).
    pub smtp_url: Option<String>,
    /// The sender.
    pub from: String,
    /// Failures of one event before it is set aside as a dead letter.
    pub max_attempts: u32,
    /// After a page of events, how long to let the next ones gather before asking again, in
    /// milliseconds (an idle stream is waited on at the producer: a long poll).
    pub poll_ms: u64,
    /// Test only: freeze after writing a message, before recording it (`pause_after_mail`),
    /// once.
    pub failpoint: Option<String>,
}

impl Default for NotificationsSettings {
    fn default() -> Self {
        NotificationsSettings {
            users_url: "http://127.0.0.1:8081".to_owned(),
            orders_url: "http://127.0.0.1:8085".to_owned(),
            mail_dir: None,
            smtp_url: None,
            from: "shopmesh <shop@shopmesh.local>".to_owned(),
            max_attempts: 5,
            poll_ms: 200,
            failpoint: None,
        }
    }
}

impl Config {
    /// Where `.eml` files also go, if anywhere (a relative path is under the data directory).
    pub fn mail_dir(&self) -> Option<PathBuf> {
        self.notifications
            .mail_dir
            .as_ref()
            .filter(|dir| !dir.as_os_str().is_empty())
            .map(|dir| self.data_dir.join(dir))
    }

    /// The idle poll interval.
    pub fn poll(&self) -> Duration {
        Duration::from_millis(self.notifications.poll_ms.max(10))
    }
}
