//! Test helpers shared by the services' black-box tests (a dev-dependency only).
//!
//! - [`Issuer`]: stands in for the users service where a test needs tokens but not accounts: an
//!   Ed25519 signer plus a JWKS endpoint on port 0, so the service under test verifies tokens
//!   exactly as in production (fetching the JWKS by URL).
//! - [`assert_problem`]: checks an `application/problem+json` answer's status, code and field.
//! - [`outbox_events`]: the events a service has published, read from its stream.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use serde_json::Value;
use shopmesh_auth::signing::generate_seed;
use shopmesh_auth::{AuthSettings, JwkSet, Role, TokenSigner};
use uuid::Uuid;

/// Issues tokens and serves their JWKS.
pub struct Issuer {
    signer: TokenSigner,
    addr: SocketAddr,
}

impl Issuer {
    /// Starts the JWKS endpoint.
    pub async fn start() -> Issuer {
        let signer = TokenSigner::from_seed(
            &generate_seed(),
            &AuthSettings::default(),
            Duration::from_secs(900),
        )
        .expect("test signer");
        let jwks = JwkSet {
            keys: vec![signer.jwk()],
        };
        let app = Router::new().route(
            "/.well-known/jwks.json",
            get(move || {
                let jwks = jwks.clone();
                async move { axum::Json(jwks) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind jwks");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Issuer { signer, addr }
    }

    /// The JWKS URL, for `SHOPMESH_AUTH__JWKS_URL`.
    pub fn jwks_url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }

    /// A token for a new customer; returns (user id, token).
    pub fn customer(&self) -> (Uuid, String) {
        self.token(Role::Customer)
    }

    /// A token for a new admin; returns (user id, token).
    pub fn admin(&self) -> (Uuid, String) {
        self.token(Role::Admin)
    }

    fn token(&self, role: Role) -> (Uuid, String) {
        let id = Uuid::now_v7();
        (id, self.signer.issue(id, role).expect("token"))
    }
}

/// Asserts a problem+json answer with this status, code and (if given) field; returns its body.
pub async fn assert_problem(
    response: reqwest::Response,
    status: u16,
    code: &str,
    field: Option<&str>,
) -> Value {
    assert_eq!(response.status(), status, "status");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "content type"
    );
    let body: Value = response.json().await.expect("problem json");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status, "{body}");
    if let Some(field) = field {
        assert_eq!(body["field"], field, "{body}");
    }
    body
}

/// The events in the stream of the service at `addr` (`/internal/outbox`, from the start) that
/// `wanted` picks, once `expected` of them are there or after 10 s, whatever is there then. On
/// PostgreSQL events are numbered, and so readable, a moment after their commit.
pub async fn outbox_events(
    addr: SocketAddr,
    wanted: impl Fn(&Value) -> bool,
    expected: usize,
) -> Vec<Value> {
    let started = std::time::Instant::now();
    loop {
        let page: Value = reqwest::get(format!("http://{addr}/internal/outbox?after=0&limit=500"))
            .await
            .expect("outbox")
            .json()
            .await
            .expect("outbox json");
        let found: Vec<Value> = page["events"]
            .as_array()
            .expect("events")
            .iter()
            .filter(|e| wanted(e))
            .cloned()
            .collect();
        if found.len() >= expected || started.elapsed() > Duration::from_secs(10) {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
