//! The notifications service: one e-mail per user and order event, exactly once.
//!
//! # Layout
//! - [`mail`]: the message for each event (its RFC 5322 text, kept in the database; sent over
//!   SMTP or also written as `<mail_dir>/<event id>.eml` when configured), and the consumer's
//!   handler.
//! - [`config`]: `[notifications]`: where the producers are, SMTP or a mail directory, attempts.
//! - this file: the consumer (pulling `user.registered` from users and `order.*` from orders
//!   over the embedded transport), `GET /api/v1/admin/notifications` and each message's text
//!   at `…/{event_id}/message`, and the dead letters at `/internal/dlq`
//!   (`shopmesh events dlq list|redrive`).
//!
//! Exactly one message per event: the consumer records the event in its inbox, the message in
//! `notifications` and its cursor in one transaction; a crash before that commit redelivers the
//! event, whose message file, if any, is simply written again under the same name.

pub mod config;
pub mod mail;
pub mod store;

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use shopmesh_auth::Verifier;
use shopmesh_auth::extract::AdminUser;
use shopmesh_db::Db;
use shopmesh_events::consumer::{Consumer, Subscription};
use shopmesh_mesh::{Mesh, Protocol};
use shopmesh_problem::extract::Query;
use shopmesh_problem::{Problem, ProblemBody};
use shopmesh_runtime::{App, ReadinessCheck, Server, Service};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use config::Config;

/// The migrations of the notifications database.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// What handlers share.
#[derive(Clone, axum::extract::FromRef)]
pub struct AppState {
    db: Db,
    verifier: Verifier,
}

/// One message sent.
#[derive(Debug, Serialize, ToSchema)]
pub struct NotificationView {
    /// The event it answers.
    event_id: String,
    /// The event's type (`user.registered`, `order.paid`, ...).
    #[serde(rename = "type")]
    kind: String,
    /// `Name <address>`.
    to: String,
    /// The subject.
    subject: String,
    /// Where it went besides this list: the `.eml` file (with `notifications.mail_dir`) or
    /// `smtp:<Message-ID>`; absent when it is only kept here.
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<String>,
    /// The message itself (`message/rfc822`): `/api/v1/admin/notifications/{event_id}/message`;
    /// absent for messages recorded before their text was kept (see `file`).
    #[serde(skip_serializing_if = "Option::is_none")]
    message_url: Option<String>,
    /// When it was written (RFC 3339).
    created_at: String,
}

/// The newest messages first.
#[derive(Debug, Serialize, ToSchema)]
pub struct NotificationList {
    items: Vec<NotificationView>,
}

/// `?limit=`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<i64>,
}

/// Lists the messages sent, newest first (admins).
#[utoipa::path(get, path = "/api/v1/admin/notifications", tag = "notifications", security(("bearer" = [])),
    params(("limit" = Option<i64>, Query, description = "How many, 1 to 500 (default 50)")),
    responses(
        (status = 200, description = "The messages sent, newest first", body = NotificationList),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn list(
    State(state): State<AppState>,
    _admin: AdminUser,
    Query(query): Query<ListQuery>,
) -> Result<Json<NotificationList>, Problem> {
    let limit = query.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(shopmesh_problem::Invalid::new(
            "limit",
            "invalid_limit",
            "must be from 1 to 500",
        )
        .into());
    }
    let items = store::recent(&state.db, limit)
        .await
        .map_err(|e| Problem::internal_caused_by(format!("listing notifications failed: {e}")))?
        .into_iter()
        .map(|row| NotificationView {
            message_url: row
                .kept
                .then(|| format!("/api/v1/admin/notifications/{}/message", row.event_id)),
            event_id: row.event_id,
            kind: row.kind,
            to: row.to,
            subject: row.subject,
            file: Some(row.went).filter(|f| !f.is_empty()),
            created_at: OffsetDateTime::from_unix_timestamp_nanos(
                i128::from(row.created_at) * 1_000,
            )
            .ok()
            .and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_default(),
        })
        .collect();
    Ok(Json(NotificationList { items }))
}

/// One message's text, as it was composed (admins): save it as a `.eml` file to open it in a
/// mail reader.
#[utoipa::path(get, path = "/api/v1/admin/notifications/{event_id}/message", tag = "notifications",
    security(("bearer" = [])),
    params(("event_id" = String, Path, description = "The event the message answers")),
    responses(
        (status = 200, description = "The message (RFC 5322)", body = String, content_type = "message/rfc822"),
        (status = 401, description = "No valid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "No such message (or one recorded before texts were kept)", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn message(
    State(state): State<AppState>,
    _admin: AdminUser,
    Path(event_id): Path<String>,
) -> Result<Response, Problem> {
    let text = store::text(&state.db, &event_id)
        .await
        .map_err(|e| Problem::internal_caused_by(format!("reading a message failed: {e}")))?;
    match text.flatten() {
        Some(text) => {
            use axum::http::header::{CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_TYPE};
            // Personal data: never kept by a cache. The event id matched a row, so it is one
            // of ours (a UUID): safe inside the quotes.
            let disposition = format!("attachment; filename=\"{event_id}.eml\"");
            Ok((
                [
                    (CONTENT_TYPE, "message/rfc822".to_owned()),
                    (CACHE_CONTROL, "private, no-store".to_owned()),
                    (CONTENT_DISPOSITION, disposition),
                ],
                text,
            )
                .into_response())
        }
        None => Err(Problem::new(
            shopmesh_problem::Kind::NotFound,
            "message_not_found",
            "Message not found",
        )
        .with_detail("no message with its text kept answers this event id")),
    }
}

fn routes(state: AppState) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(message))
        .with_state(state)
}

/// Where dead letters are: the consumer's table (embedded transport) or the broker's
/// dead-letter queue (RabbitMQ).
#[derive(Clone)]
struct DeadLetters {
    consumer: Arc<Consumer>,
    events: shopmesh_events::EventsSettings,
}

/// `GET /internal/dlq`, `POST /internal/dlq/redrive` (internal port only).
fn dlq_routes(consumer: Arc<Consumer>, events: shopmesh_events::EventsSettings) -> Router {
    Router::new()
        .route("/internal/dlq", get(dead_letters))
        .route("/internal/dlq/redrive", post(redrive))
        .with_state(DeadLetters { consumer, events })
}

async fn dead_letters(State(dlq): State<DeadLetters>) -> Response {
    let listed = if dlq.events.rabbitmq_url.is_some() {
        shopmesh_events::rabbit::dead_letters(&dlq.events, "notifications")
            .await
            .map(|events| {
                events
                    .into_iter()
                    .map(|event| {
                        serde_json::json!({"producer": "rabbitmq", "event": event,
                            "error": "delivery limit reached"})
                    })
                    .collect::<Vec<_>>()
            })
            .map_err(|e| e.to_string())
    } else {
        dlq.consumer
            .dead_letters()
            .await
            .map(|letters| {
                letters
                    .into_iter()
                    .filter_map(|l| serde_json::to_value(l).ok())
                    .collect()
            })
            .map_err(|e| e.to_string())
    };
    match listed {
        Ok(letters) => Json(serde_json::json!({ "dead_letters": letters })).into_response(),
        Err(e) => {
            Problem::internal_caused_by(format!("reading dead letters failed: {e}")).into_response()
        }
    }
}

async fn redrive(State(dlq): State<DeadLetters>) -> Response {
    // Through RabbitMQ, redriven events go back to the queue and are handled from there.
    let result = if dlq.events.rabbitmq_url.is_some() {
        shopmesh_events::rabbit::redrive(&dlq.events, "notifications")
            .await
            .map(|moved| (moved, 0))
            .map_err(|e| e.to_string())
    } else {
        dlq.consumer.redrive().await.map_err(|e| e.to_string())
    };
    match result {
        Ok((handled, failing)) => {
            Json(serde_json::json!({ "handled": handled, "still_failing": failing }))
                .into_response()
        }
        Err(e) => Problem::internal_caused_by(format!("redrive failed: {e}")).into_response(),
    }
}

/// The notifications service.
pub struct Application;

impl Application {
    /// Connects, migrates, prepares the consumer and binds.
    pub async fn build(config: Config) -> anyhow::Result<Service> {
        let jwks_url = config.auth.require_jwks_url()?;
        let db = Db::open(&config.database_url(), &config.database, &MIGRATOR).await?;
        shopmesh_events::consumer::install(&db).await?;
        let mesh = Mesh::new(config.mesh.clone());
        let subscriptions = vec![
            Subscription {
                producer: "users".to_owned(),
                upstream: mesh.upstream(
                    "users",
                    &config.notifications.users_url,
                    Protocol::Http,
                )?,
            },
            Subscription {
                producer: "orders".to_owned(),
                upstream: mesh.upstream(
                    "orders",
                    &config.notifications.orders_url,
                    Protocol::Http,
                )?,
            },
        ];
        let smtp = config
            .notifications
            .smtp_url
            .as_deref()
            .map(mail::smtp)
            .transpose()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        let mailer = mail::Mailer {
            dir: config.mail_dir(),
            smtp,
            from: config.notifications.from.clone(),
            failpoint: config.notifications.failpoint.as_ref().map(|name| {
                config
                    .data_dir
                    .join(format!("notifications-failpoint-{name}.fired"))
            }),
        };
        let consumer = Arc::new(
            Consumer::new(
                db.clone(),
                Arc::new(mailer),
                config.notifications.max_attempts,
                config.poll(),
            )
            .reading_as("notifications", &config.events),
        );
        let state = AppState {
            db: db.clone(),
            verifier: Verifier::from_jwks_url(&config.auth, jwks_url),
        };
        let (public, openapi) = routes(state).split_for_parts();
        let router = App::new("notifications")
            .http(public)
            .http(dlq_routes(consumer.clone(), config.events.clone()))
            .openapi(openapi)
            .mesh(mesh)
            .readiness(ReadinessCheck::new("database", db.probe()))
            .into_router();
        let server = Server::bind("notifications", &config.server, router).await?;
        // RabbitMQ when configured (one quorum queue for the user and order events), else the
        // embedded transport (pull each producer's stream). Stopped between messages: one
        // being sent is recorded before the process goes.
        let events = config.events.clone();
        Ok(Service::new(server)
            .task("events", move |stopping| {
                consumer.follow_all(
                    events,
                    "notifications",
                    shopmesh_contracts::bindings("notifications"),
                    subscriptions,
                    shopmesh_runtime::stopped(stopping),
                )
            })
            .on_stop(async move { db.close().await }))
    }
}
