//! A users service on port 0 with a fresh database, and a client for it.

use std::net::SocketAddr;

use reqwest::{Client, Response};
use serde_json::{Value, json};
use shopmesh_config::Sources;
use shopmesh_db::testing::TestDb;
use shopmesh_users::{Application, Config};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct TestApp {
    pub addr: SocketAddr,
    pub client: Client,
    db: Option<TestDb>,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Configuration for a test server on `db`, with extra `SHOPMESH_*` variables.
pub fn config(db: &TestDb, extra: &[(&str, &str)]) -> Config {
    let mut sources = Sources::empty()
        .set("SHOPMESH_SERVER__PORT", "0")
        .set("SHOPMESH_SERVER__SHUTDOWN_GRACE_SECS", "1")
        .set("SHOPMESH_DATABASE__URL", db.url_string());
    for (k, v) in extra {
        sources = sources.set(*k, *v);
    }
    Config::load(&sources).expect("test configuration")
}

impl TestApp {
    pub async fn start(db: TestDb) -> TestApp {
        let config = config(&db, &[]);
        TestApp::start_with(db, config).await
    }

    pub async fn start_with(db: TestDb, config: Config) -> TestApp {
        let app = Application::build(config).await.expect("build users app");
        let addr = app.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(app.run_until(async {
            let _ = rx.await;
        }));
        TestApp {
            addr,
            client: Client::new(),
            db: Some(db),
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    /// Stops the server and gives back its database.
    pub async fn stop(mut self) -> TestDb {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle.await.expect("join").expect("server ran cleanly");
        }
        self.db.take().expect("the database is there until stop")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request")
    }

    pub async fn register(&self, email: &str, password: &str) -> Response {
        self.post_json(
            "/api/v1/register",
            &json!({"email": email, "name": "Test User", "password": password}),
        )
        .await
    }

    pub async fn login(&self, email: &str, password: &str) -> Response {
        self.post_json(
            "/api/v1/login",
            &json!({"email": email, "password": password}),
        )
        .await
    }

    /// Registers and logs in; returns (user id, token).
    pub async fn signed_up(&self, email: &str) -> (String, String) {
        let registered = self.register(email, "correct horse battery").await;
        assert_eq!(registered.status(), 201, "register {email}");
        let user: Value = registered.json().await.expect("json");
        let token = self.token(email, "correct horse battery").await;
        (user["id"].as_str().expect("id").to_owned(), token)
    }

    pub async fn token(&self, email: &str, password: &str) -> String {
        let response = self.login(email, password).await;
        assert_eq!(response.status(), 200, "login {email}");
        let body: Value = response.json().await.expect("json");
        body["access_token"].as_str().expect("token").to_owned()
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Response {
        let mut request = self.client.get(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("request")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}
