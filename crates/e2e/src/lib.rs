//! End-to-end harness: catalog, inventory, payments, cart, orders and the gateway as real servers on
//! port 0 in one process, each with its own fresh database (SQLite or PostgreSQL), tokens from
//! a test issuer. The whole-system tests with real processes are in `crates/cli/tests`.
//!
//! This crate may depend on every service: it is a test harness, not a service.

use std::net::SocketAddr;

use reqwest::{Client, Method, Response};
use serde_json::{Value, json};
use shopmesh_config::Sources;
use shopmesh_db::testing::TestDb;
use shopmesh_testkit::Issuer;
use tokio::sync::oneshot;

/// Declares each listed `async fn name(backend: Backend)` as two tests, `sqlite::name` and
/// `postgres::name`.
#[macro_export]
macro_rules! test_on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    super::$test($crate::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    super::$test($crate::Backend::Postgres).await;
                }
            )*
        }
    };
}

/// Which database every service of a [`Shop`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A temp SQLite file per service.
    Sqlite,
    /// A new PostgreSQL database per service.
    Postgres,
}

async fn database(backend: Backend) -> Option<TestDb> {
    match backend {
        Backend::Sqlite => Some(TestDb::sqlite()),
        Backend::Postgres => TestDb::postgres().await,
    }
}

/// The running services.
pub struct Shop {
    /// `http://127.0.0.1:<gateway port>`.
    pub gateway: String,
    /// The payments service's gRPC address.
    pub payments: SocketAddr,
    /// The inventory's gRPC address.
    pub inventory: SocketAddr,
    /// Mints tokens.
    pub issuer: Issuer,
    /// An admin's token.
    pub admin: String,
    /// An HTTP client.
    pub client: Client,
    _dbs: Vec<TestDb>,
    _stops: Vec<oneshot::Sender<()>>,
}

fn sources(db: &TestDb, issuer: &Issuer, extra: &[(&str, String)]) -> Sources {
    let mut sources = Sources::empty()
        .set("SHOPMESH_SERVER__PORT", "0")
        .set("SHOPMESH_SERVER__SHUTDOWN_GRACE_SECS", "1")
        .set("SHOPMESH_DATABASE__URL", db.url_string())
        .set("SHOPMESH_AUTH__JWKS_URL", issuer.jwks_url());
    for (k, v) in extra {
        sources = sources.set(*k, v.clone());
    }
    sources
}

impl Shop {
    /// Starts the shop; `None` when PostgreSQL is asked for but not available (see
    /// `shopmesh_db::testing`). `orders` are extra `SHOPMESH_ORDERS__*` settings.
    pub async fn start(backend: Backend, orders: &[(&str, &str)]) -> Option<Shop> {
        let issuer = Issuer::start().await;
        let mut dbs = Vec::new();
        let mut stops = Vec::new();
        let mut spawn = |stop: oneshot::Sender<()>| stops.push(stop);

        let db = database(backend).await?;
        let extra = [("SHOPMESH_INVENTORY__SWEEP_INTERVAL_MS", "100".to_owned())];
        let inventory = shopmesh_inventory::Application::build(
            shopmesh_inventory::Config::load(&sources(&db, &issuer, &extra))
                .expect("inventory config"),
        )
        .await
        .expect("inventory");
        let inventory_addr = inventory.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(inventory.run_until(async {
            let _ = rx.await;
        }));
        spawn(tx);
        dbs.push(db);

        let db = database(backend).await?;
        let extra = [(
            "SHOPMESH_CATALOG__INVENTORY_URL",
            format!("http://{inventory_addr}"),
        )];
        let catalog = shopmesh_catalog::Application::build(
            shopmesh_catalog::Config::load(&sources(&db, &issuer, &extra)).expect("catalog config"),
        )
        .await
        .expect("catalog");
        let catalog_addr = catalog.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(catalog.run_until(async {
            let _ = rx.await;
        }));
        spawn(tx);
        dbs.push(db);

        let db = database(backend).await?;
        let payments = shopmesh_payments::Application::build(
            shopmesh_payments::Config::load(&sources(&db, &issuer, &[])).expect("payments config"),
        )
        .await
        .expect("payments");
        let payments_addr = payments.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(payments.run_until(async {
            let _ = rx.await;
        }));
        spawn(tx);
        dbs.push(db);

        let db = database(backend).await?;
        let extra = [(
            "SHOPMESH_CART__CATALOG_URL",
            format!("http://{catalog_addr}"),
        )];
        let cart = shopmesh_cart::Application::build(
            shopmesh_cart::Config::load(&sources(&db, &issuer, &extra)).expect("cart config"),
        )
        .await
        .expect("cart");
        let cart_addr = cart.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(cart.run_until(async {
            let _ = rx.await;
        }));
        spawn(tx);
        dbs.push(db);

        let db = database(backend).await?;
        let mut extra = vec![
            ("SHOPMESH_ORDERS__CART_URL", format!("http://{cart_addr}")),
            (
                "SHOPMESH_ORDERS__CATALOG_URL",
                format!("http://{catalog_addr}"),
            ),
            (
                "SHOPMESH_ORDERS__INVENTORY_URL",
                format!("http://{inventory_addr}"),
            ),
            (
                "SHOPMESH_ORDERS__PAYMENTS_URL",
                format!("http://{payments_addr}"),
            ),
            ("SHOPMESH_ORDERS__WORKER_INTERVAL_MS", "100".to_owned()),
        ];
        extra.extend(orders.iter().map(|(k, v)| (*k, (*v).to_owned())));
        let orders_app = shopmesh_orders::Application::build(
            shopmesh_orders::Config::load(&sources(&db, &issuer, &extra)).expect("orders config"),
        )
        .await
        .expect("orders");
        let orders_addr = orders_app.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(orders_app.run_until(async {
            let _ = rx.await;
        }));
        spawn(tx);
        dbs.push(db);

        // Every test request comes from 127.0.0.1: the per-address limit is for real clients
        // (the gateway's own tests cover it).
        let gateway_sources = Sources::empty()
            .set("SHOPMESH_SERVER__PORT", "0")
            .set("SHOPMESH_GATEWAY__RATE_LIMIT__PER_IP_PER_SECOND", "0")
            .set("SHOPMESH_AUTH__JWKS_URL", issuer.jwks_url())
            .set(
                "SHOPMESH_GATEWAY__UPSTREAMS__CATALOG",
                format!("http://{catalog_addr}"),
            )
            .set(
                "SHOPMESH_GATEWAY__UPSTREAMS__INVENTORY",
                format!("http://{inventory_addr}"),
            )
            .set(
                "SHOPMESH_GATEWAY__UPSTREAMS__ORDERS",
                format!("http://{orders_addr}"),
            )
            .set(
                "SHOPMESH_GATEWAY__UPSTREAMS__CART",
                format!("http://{cart_addr}"),
            );
        let gateway = shopmesh_gateway::Application::build(
            shopmesh_gateway::Config::load(&gateway_sources).expect("gateway config"),
        )
        .await
        .expect("gateway");
        let gateway_addr = gateway.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(gateway.run_until(async {
            let _ = rx.await;
        }));
        spawn(tx);

        let (_, admin) = issuer.admin();
        let shop = Shop {
            gateway: format!("http://{gateway_addr}"),
            payments: payments_addr,
            inventory: inventory_addr,
            issuer,
            admin,
            client: Client::new(),
            _dbs: dbs,
            _stops: stops,
        };
        shop.wait_ready().await;
        Some(shop)
    }

    async fn wait_ready(&self) {
        for _ in 0..100 {
            if let Ok(r) = self
                .client
                .get(format!("{}/readyz", self.gateway))
                .send()
                .await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("the gateway never became ready");
    }

    /// A request through the gateway.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        key: Option<&str>,
    ) -> Response {
        let mut request = self
            .client
            .request(method, format!("{}{}", self.gateway, path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        request.send().await.expect("request")
    }

    /// Creates a product priced `price` with `stock` units; returns its id.
    pub async fn product(&self, sku: &str, price: i64, stock: i64) -> String {
        let body =
            json!({"sku": sku, "name": sku, "price": price, "currency": "EUR", "category": "test"});
        let created = self
            .send(
                Method::POST,
                "/api/v1/products",
                Some(&self.admin),
                Some(&body),
                None,
            )
            .await;
        assert_eq!(created.status(), 201, "create product");
        let id = created.json::<Value>().await.expect("json")["id"]
            .as_str()
            .expect("id")
            .to_owned();
        if stock > 0 {
            let stocked = self
                .send(
                    Method::POST,
                    &format!("/api/v1/inventory/{id}"),
                    Some(&self.admin),
                    Some(&json!({"quantity": stock})),
                    None,
                )
                .await;
            assert_eq!(stocked.status(), 200, "stock product");
        }
        id
    }

    /// `available` and `reserved` of a product.
    pub async fn stock(&self, product: &str) -> (i64, i64) {
        let level: Value = self
            .send(
                Method::GET,
                &format!("/api/v1/inventory/{product}"),
                None,
                None,
                None,
            )
            .await
            .json()
            .await
            .expect("json");
        (
            level["available"].as_i64().expect("available"),
            level["reserved"].as_i64().expect("reserved"),
        )
    }

    /// Places an order for `quantity` of `product` with a fresh key.
    pub async fn order(&self, token: &str, product: &str, quantity: i64) -> Response {
        let body = json!({"items": [{"product_id": product, "quantity": quantity}]});
        let key = uuid::Uuid::new_v4().to_string();
        self.send(
            Method::POST,
            "/api/v1/orders",
            Some(token),
            Some(&body),
            Some(&key),
        )
        .await
    }

    /// Pays an order with a card number.
    pub async fn pay(&self, token: &str, order: &str, number: &str) -> Response {
        let body =
            json!({"card": {"number": number, "exp_month": 12, "exp_year": 2035, "cvc": "123"}});
        self.send(
            Method::POST,
            &format!("/api/v1/orders/{order}/pay"),
            Some(token),
            Some(&body),
            None,
        )
        .await
    }
}
