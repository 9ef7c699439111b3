//! Black-box tests of the inventory: a real server on port 0, a fresh database per test, on
//! SQLite and PostgreSQL. Reservations are driven over gRPC, as orders will drive them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use reqwest::{Client, Method, Response};
use serde_json::{Value, json};
use shopmesh_config::Sources;
use shopmesh_db::testing::TestDb;
use shopmesh_inventory::{Application, Config};
use shopmesh_proto::inventory::v1::inventory_client::InventoryClient;
use shopmesh_proto::inventory::v1::{
    CommitRequest, GetStockRequest, Line, ReleaseRequest, ReserveRequest, Stock,
};
use shopmesh_testkit::{Issuer, assert_problem};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use uuid::Uuid;

shopmesh_db::test_on_both_backends!(
    anyone_reads_stock_and_only_admins_change_it,
    removing_more_than_is_free_is_a_409_and_changes_nothing,
    a_reservation_is_all_or_nothing,
    two_hundred_concurrent_reservations_of_one_unit_against_fifty_hold_exactly_fifty,
    a_reservation_is_idempotent_by_order_id_even_when_copies_race,
    commit_sells_release_restocks_and_both_repeat_harmlessly,
    every_stock_move_reports_the_levels_after_it,
    releasing_an_order_first_blocks_a_late_reservation,
    an_expired_hold_is_released_by_the_sweeper,
    an_expired_hold_cannot_be_committed,
    bad_grpc_input_names_the_field,
    concurrent_releases_and_commits_of_one_order_move_its_stock_once,
    the_demo_stock_is_seeded_once,
);

struct TestApp {
    addr: SocketAddr,
    client: Client,
    issuer: Issuer,
    admin: String,
    grpc: InventoryClient<Channel>,
    _db: TestDb,
    _stop: oneshot::Sender<()>,
}

async fn start_with(db: TestDb, extra: &[(&str, &str)]) -> TestApp {
    let issuer = Issuer::start().await;
    let mut sources = Sources::empty()
        .set("SHOPMESH_SERVER__PORT", "0")
        .set("SHOPMESH_DATABASE__URL", db.url_string())
        .set("SHOPMESH_AUTH__JWKS_URL", issuer.jwks_url());
    for (k, v) in extra {
        sources = sources.set(*k, *v);
    }
    let app = Application::build(Config::load(&sources).expect("config"))
        .await
        .expect("build inventory");
    let addr = app.local_addr().expect("addr");
    let (stop, rx) = oneshot::channel::<()>();
    tokio::spawn(app.run_until(async {
        let _ = rx.await;
    }));
    let grpc = InventoryClient::connect(format!("http://{addr}"))
        .await
        .expect("grpc");
    let (_, admin) = issuer.admin();
    TestApp {
        addr,
        client: Client::new(),
        issuer,
        admin,
        grpc,
        _db: db,
        _stop: stop,
    }
}

async fn start(db: TestDb) -> TestApp {
    start_with(db, &[]).await
}

fn line(product: Uuid, quantity: i64) -> Line {
    Line {
        product_id: product.to_string(),
        quantity,
    }
}

fn reserve_request(order: Uuid, lines: Vec<Line>, ttl: i64) -> ReserveRequest {
    ReserveRequest {
        order_id: order.to_string(),
        lines,
        ttl_seconds: ttl,
    }
}

fn problem_code(status: &tonic::Status) -> &str {
    status
        .metadata()
        .get("x-problem-code")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

impl TestApp {
    async fn send(
        &self,
        method: Method,
        product: Uuid,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Response {
        let mut request = self.client.request(
            method,
            format!("http://{}/api/v1/inventory/{product}", self.addr),
        );
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.expect("request")
    }

    /// An admin's stock change (`POST` adds, `DELETE` removes) with this `quantity` (any JSON,
    /// so that bad ones can be sent).
    async fn admin(&self, method: Method, product: Uuid, quantity: Value) -> Response {
        self.send(
            method,
            product,
            Some(&self.admin),
            Some(json!({ "quantity": quantity })),
        )
        .await
    }

    async fn stock_up(&self, product: Uuid, quantity: i64) {
        let r = self.admin(Method::POST, product, json!(quantity)).await;
        assert_eq!(r.status(), 200);
    }

    async fn level(&self, product: Uuid) -> Stock {
        let mut grpc = self.grpc.clone();
        let stock = grpc
            .get_stock(GetStockRequest {
                product_ids: vec![product.to_string()],
            })
            .await
            .expect("stock")
            .into_inner()
            .stock;
        let level = stock.into_iter().next().expect("one level");
        assert_eq!(
            level.added - level.removed,
            level.available + level.reserved + level.sold,
            "the books balance: {level:?}"
        );
        assert!(
            level.available >= 0 && level.reserved >= 0 && level.sold >= 0,
            "{level:?}"
        );
        level
    }
}

async fn anyone_reads_stock_and_only_admins_change_it(db: TestDb) {
    let app = start(db).await;
    let product = Uuid::now_v7();
    let never_stocked: Value = app
        .send(Method::GET, product, None, None)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        never_stocked,
        json!({"product_id": product, "available": 0, "reserved": 0})
    );
    let anonymous = app
        .send(Method::POST, product, None, Some(json!({"quantity": 5})))
        .await;
    assert_problem(anonymous, 401, "unauthenticated", None).await;
    let (_, customer) = app.issuer.customer();
    let customer_try = app
        .send(
            Method::POST,
            product,
            Some(&customer),
            Some(json!({"quantity": 5})),
        )
        .await;
    assert_problem(customer_try, 403, "forbidden", None).await;
    let zero = app.admin(Method::POST, product, json!(0)).await;
    assert_problem(zero, 422, "invalid_quantity", Some("quantity")).await;
    let fraction = app.admin(Method::POST, product, json!(1.5)).await;
    assert_problem(fraction, 400, "invalid_field", Some("quantity")).await;
    let added = app.admin(Method::POST, product, json!(10)).await;
    assert_eq!(added.status(), 200);
    assert_eq!(added.json::<Value>().await.expect("json")["available"], 10);
    let removed = app.admin(Method::DELETE, product, json!(3)).await;
    assert_eq!(removed.json::<Value>().await.expect("json")["available"], 7);
    let level = app.level(product).await;
    assert_eq!((level.added, level.removed, level.on_hand), (10, 3, 7));
    let malformed = app
        .client
        .get(format!("http://{}/api/v1/inventory/not-a-uuid", app.addr))
        .send()
        .await
        .expect("send");
    assert_problem(malformed, 400, "invalid_path_parameter", Some("product_id")).await;
}

async fn removing_more_than_is_free_is_a_409_and_changes_nothing(db: TestDb) {
    let app = start(db).await;
    let product = Uuid::now_v7();
    app.stock_up(product, 5).await;
    let mut grpc = app.grpc.clone();
    grpc.reserve(reserve_request(Uuid::now_v7(), vec![line(product, 3)], 600))
        .await
        .expect("reserve");
    // 5 on hand, 3 reserved: only 2 are free to remove.
    let too_many = app.admin(Method::DELETE, product, json!(3)).await;
    let body = assert_problem(too_many, 409, "insufficient_stock", Some("quantity")).await;
    assert!(
        body["detail"].as_str().expect("detail").contains("Only 2"),
        "{body}"
    );
    let level = app.level(product).await;
    assert_eq!((level.on_hand, level.reserved, level.removed), (5, 3, 0));
}

async fn a_reservation_is_all_or_nothing(db: TestDb) {
    let app = start(db).await;
    let (plenty, scarce) = (Uuid::now_v7(), Uuid::now_v7());
    app.stock_up(plenty, 5).await;
    app.stock_up(scarce, 1).await;
    let mut grpc = app.grpc.clone();
    let order = Uuid::now_v7();
    let refused = grpc
        .reserve(reserve_request(
            order,
            vec![line(plenty, 2), line(scarce, 2)],
            600,
        ))
        .await
        .expect_err("not enough of one line");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert_eq!(problem_code(&refused), "insufficient_stock");
    assert!(
        refused.message().contains(&scarce.to_string()),
        "{}",
        refused.message()
    );
    assert_eq!(
        app.level(plenty).await.reserved,
        0,
        "the line that fit was rolled back"
    );
    assert_eq!(app.level(scarce).await.reserved, 0);
    // Nothing of the refused order was kept (its reservation neither): once the stock is
    // there, the same order is held like any new one.
    app.stock_up(scarce, 1).await;
    grpc.reserve(reserve_request(
        order,
        vec![line(plenty, 2), line(scarce, 2)],
        600,
    ))
    .await
    .expect("reserved once there is stock");
    assert_eq!(app.level(plenty).await.reserved, 2);
    assert_eq!(app.level(scarce).await.reserved, 2);
    let unknown = grpc
        .reserve(reserve_request(
            Uuid::now_v7(),
            vec![line(Uuid::now_v7(), 1)],
            600,
        ))
        .await
        .expect_err("never stocked");
    assert_eq!(problem_code(&unknown), "insufficient_stock");
}

async fn two_hundred_concurrent_reservations_of_one_unit_against_fifty_hold_exactly_fifty(
    db: TestDb,
) {
    let app = start(db).await;
    let product = Uuid::now_v7();
    app.stock_up(product, 50).await;
    let attempts = (0..200).map(|_| {
        let mut grpc = app.grpc.clone();
        tokio::spawn(async move {
            grpc.reserve(reserve_request(Uuid::now_v7(), vec![line(product, 1)], 600))
                .await
                .map_err(|status| problem_code(&status).to_owned())
        })
    });
    let results = futures_util::future::join_all(attempts).await;
    let held = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
    let refused: Vec<&String> = results
        .iter()
        .filter_map(|r| match r {
            Ok(Err(code)) => Some(code),
            _ => None,
        })
        .collect();
    assert_eq!(held, 50, "exactly the stock is held");
    assert_eq!(refused.len(), 150);
    assert!(
        refused.iter().all(|c| *c == "insufficient_stock"),
        "{refused:?}"
    );
    let level = app.level(product).await;
    assert_eq!(
        (level.available, level.reserved, level.on_hand),
        (0, 50, 50)
    );
}

async fn a_reservation_is_idempotent_by_order_id_even_when_copies_race(db: TestDb) {
    let app = start(db).await;
    let product = Uuid::now_v7();
    app.stock_up(product, 10).await;
    let order = Uuid::now_v7();
    let copies = (0..20).map(|_| {
        let mut grpc = app.grpc.clone();
        tokio::spawn(async move {
            grpc.reserve(reserve_request(order, vec![line(product, 3)], 600))
                .await
                .map(|r| r.into_inner().expires_at)
        })
    });
    let answers: Vec<String> = futures_util::future::join_all(copies)
        .await
        .into_iter()
        .map(|r| r.expect("join").expect("every copy succeeds"))
        .collect();
    assert!(
        answers.iter().all(|a| *a == answers[0]),
        "one answer: {answers:?}"
    );
    assert_eq!(app.level(product).await.reserved, 3, "held once");
    let mut grpc = app.grpc.clone();
    let other_lines = grpc
        .reserve(reserve_request(order, vec![line(product, 4)], 600))
        .await
        .expect_err("same order, other lines");
    assert_eq!(other_lines.code(), tonic::Code::InvalidArgument);
    assert_eq!(problem_code(&other_lines), "reservation_mismatch");
}

async fn commit_sells_release_restocks_and_both_repeat_harmlessly(db: TestDb) {
    let app = start(db).await;
    let product = Uuid::now_v7();
    app.stock_up(product, 10).await;
    let order = Uuid::now_v7();
    let mut grpc = app.grpc.clone();
    grpc.reserve(reserve_request(order, vec![line(product, 3)], 600))
        .await
        .expect("reserve");
    for _ in 0..2 {
        grpc.commit(CommitRequest {
            order_id: order.to_string(),
        })
        .await
        .expect("commit");
        let level = app.level(product).await;
        assert_eq!(
            (level.on_hand, level.reserved, level.sold, level.available),
            (7, 0, 3, 7)
        );
    }
    // Cancelling a paid order puts its units back on the shelf, once.
    for _ in 0..2 {
        grpc.release(ReleaseRequest {
            order_id: order.to_string(),
        })
        .await
        .expect("release");
        let level = app.level(product).await;
        assert_eq!(
            (level.on_hand, level.reserved, level.sold, level.available),
            (10, 0, 0, 10)
        );
    }
    let late_commit = grpc
        .commit(CommitRequest {
            order_id: order.to_string(),
        })
        .await
        .expect_err("released");
    assert_eq!(problem_code(&late_commit), "reservation_released");
    let unknown = grpc
        .commit(CommitRequest {
            order_id: Uuid::now_v7().to_string(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}

/// The `stock.changed` events about `product` in the inventory's stream, as (available,
/// reserved, on hand, sold), once `expected` are there.
async fn stock_events(app: &TestApp, product: Uuid, expected: usize) -> Vec<(i64, i64, i64, i64)> {
    let product = product.to_string();
    shopmesh_testkit::outbox_events(
        app.addr,
        |e| e["type"] == "stock.changed" && e["payload"]["product_id"] == product.as_str(),
        expected,
    )
    .await
    .iter()
    .map(|e| {
        let n = |f: &str| e["payload"][f].as_i64().expect(f);
        (n("available"), n("reserved"), n("on_hand"), n("sold"))
    })
    .collect()
}

async fn every_stock_move_reports_the_levels_after_it(db: TestDb) {
    // The catalog shows availability from these events: each must carry the levels as the
    // move left them, once per move (a repeated commit or release moves nothing).
    let app = start(db).await;
    let product = Uuid::now_v7();
    app.stock_up(product, 10).await;
    let mut grpc = app.grpc.clone();
    let (paid, dropped) = (Uuid::now_v7(), Uuid::now_v7());
    grpc.reserve(reserve_request(paid, vec![line(product, 3)], 600))
        .await
        .expect("reserve");
    for _ in 0..2 {
        grpc.commit(CommitRequest {
            order_id: paid.to_string(),
        })
        .await
        .expect("commit");
    }
    grpc.reserve(reserve_request(dropped, vec![line(product, 2)], 600))
        .await
        .expect("reserve");
    for order in [dropped, paid] {
        grpc.release(ReleaseRequest {
            order_id: order.to_string(),
        })
        .await
        .expect("release");
    }
    let expected = vec![
        (10, 0, 10, 0), // stocked
        (7, 3, 10, 0),  // held
        (7, 0, 7, 3),   // sold
        (5, 2, 7, 3),   // another held
        (7, 0, 7, 3),   // that hold released
        (10, 0, 10, 0), // the sale given back
    ];
    assert_eq!(stock_events(&app, product, expected.len()).await, expected);
    // And nothing more arrives for the repeated commit.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stock_events(&app, product, expected.len()).await, expected);
}

async fn releasing_an_order_first_blocks_a_late_reservation(db: TestDb) {
    let app = start(db).await;
    let product = Uuid::now_v7();
    app.stock_up(product, 10).await;
    let order = Uuid::now_v7();
    let mut grpc = app.grpc.clone();
    grpc.release(ReleaseRequest {
        order_id: order.to_string(),
    })
    .await
    .expect("release");
    let late = grpc
        .reserve(reserve_request(order, vec![line(product, 1)], 600))
        .await
        .expect_err("released orders stay released");
    assert_eq!(problem_code(&late), "reservation_released");
    assert_eq!(app.level(product).await.reserved, 0);
}

async fn an_expired_hold_is_released_by_the_sweeper(db: TestDb) {
    let app = start_with(db, &[("SHOPMESH_INVENTORY__SWEEP_INTERVAL_MS", "100")]).await;
    let product = Uuid::now_v7();
    app.stock_up(product, 4).await;
    let mut grpc = app.grpc.clone();
    grpc.reserve(reserve_request(Uuid::now_v7(), vec![line(product, 4)], 1))
        .await
        .expect("reserve");
    assert_eq!(app.level(product).await.available, 0);
    // Expiry is wall-clock time stored in the database, so this waits for real (about 1 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.level(product).await.available != 4 {
        assert!(Instant::now() < deadline, "the hold never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.level(product).await.reserved, 0);
}

async fn an_expired_hold_cannot_be_committed(db: TestDb) {
    // The sweeper is slow here: the commit itself must notice the expiry.
    let app = start_with(db, &[("SHOPMESH_INVENTORY__SWEEP_INTERVAL_MS", "3600000")]).await;
    let product = Uuid::now_v7();
    app.stock_up(product, 2).await;
    let order = Uuid::now_v7();
    let mut grpc = app.grpc.clone();
    grpc.reserve(reserve_request(order, vec![line(product, 2)], 1))
        .await
        .expect("reserve");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let late = grpc
        .commit(CommitRequest {
            order_id: order.to_string(),
        })
        .await
        .expect_err("expired");
    assert_eq!(problem_code(&late), "reservation_expired");
    let level = app.level(product).await;
    assert_eq!(
        (level.available, level.sold),
        (2, 0),
        "the stock went back, nothing was sold"
    );
}

async fn bad_grpc_input_names_the_field(db: TestDb) {
    let app = start(db).await;
    let mut grpc = app.grpc.clone();
    let product = Uuid::now_v7();
    let cases = [
        (
            ReserveRequest {
                order_id: "x".into(),
                lines: vec![line(product, 1)],
                ttl_seconds: 60,
            },
            "order_id",
        ),
        (reserve_request(Uuid::now_v7(), vec![], 60), "lines"),
        (
            reserve_request(Uuid::now_v7(), vec![line(product, 0)], 60),
            "lines[0].quantity",
        ),
        (
            reserve_request(Uuid::now_v7(), vec![line(product, 1), line(product, 1)], 60),
            "lines[1].product_id",
        ),
        (
            reserve_request(Uuid::now_v7(), vec![line(product, 1)], 0),
            "ttl_seconds",
        ),
    ];
    for (request, field) in cases {
        let status = grpc.reserve(request).await.expect_err(field);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{field}");
        let named = status
            .metadata()
            .get("x-problem-field")
            .and_then(|v| v.to_str().ok());
        assert_eq!(named, Some(field));
    }
}

async fn the_demo_stock_is_seeded_once(db: TestDb) {
    let app = start_with(db, &[("SHOPMESH_INVENTORY__SEED_DEMO", "true")]).await;
    // KIT-001 of demo/catalog.json starts with 25 units.
    let skillet: Uuid = "6e20fba7-3ef7-5811-a884-d72d3140dcae"
        .parse()
        .expect("uuid");
    assert_eq!(app.level(skillet).await.available, 25);
    app.stock_up(skillet, 5).await;
    let again = Application::build(
        Config::load(
            &Sources::empty()
                .set("SHOPMESH_SERVER__PORT", "0")
                .set("SHOPMESH_DATABASE__URL", app._db.url_string())
                .set("SHOPMESH_AUTH__JWKS_URL", app.issuer.jwks_url())
                .set("SHOPMESH_INVENTORY__SEED_DEMO", "true"),
        )
        .expect("config"),
    )
    .await
    .expect("second start");
    drop(again);
    assert_eq!(
        app.level(skillet).await.available,
        30,
        "a restart does not reset stock"
    );
}

async fn concurrent_releases_and_commits_of_one_order_move_its_stock_once(db: TestDb) {
    let app = start(db).await;
    let product = Uuid::now_v7();
    app.stock_up(product, 30).await;
    let mut grpc = app.grpc.clone();
    // Another order holds 10, so a double release could not hide behind `reserved >= 0`.
    grpc.reserve(reserve_request(
        Uuid::now_v7(),
        vec![line(product, 10)],
        600,
    ))
    .await
    .expect("other");
    let released = Uuid::now_v7();
    grpc.reserve(reserve_request(released, vec![line(product, 3)], 600))
        .await
        .expect("reserve");
    let racers = (0..20).map(|_| {
        let mut grpc = app.grpc.clone();
        tokio::spawn(async move {
            grpc.release(ReleaseRequest {
                order_id: released.to_string(),
            })
            .await
            .map(|_| ())
        })
    });
    for result in futures_util::future::join_all(racers).await {
        result.expect("join").expect("every release succeeds");
    }
    let level = app.level(product).await;
    assert_eq!(
        (level.reserved, level.available),
        (10, 20),
        "released once: {level:?}"
    );

    // Commit racing release on another order: exactly one of them wins, the books balance.
    let contested = Uuid::now_v7();
    grpc.reserve(reserve_request(contested, vec![line(product, 4)], 600))
        .await
        .expect("reserve");
    let racers = (0..20).map(|i| {
        let mut grpc = app.grpc.clone();
        tokio::spawn(async move {
            if i % 2 == 0 {
                grpc.commit(CommitRequest {
                    order_id: contested.to_string(),
                })
                .await
                .map(|_| ())
            } else {
                grpc.release(ReleaseRequest {
                    order_id: contested.to_string(),
                })
                .await
                .map(|_| ())
            }
        })
    });
    let results = futures_util::future::join_all(racers).await;
    for result in &results {
        if let Ok(Err(status)) = result {
            assert_eq!(problem_code(status), "reservation_released", "{status:?}");
        }
    }
    let level = app.level(product).await;
    assert_eq!(
        level.reserved, 10,
        "the contested hold is gone either way: {level:?}"
    );
    assert!(
        level.sold == 0 || level.sold == 4,
        "sold once or restocked: {level:?}"
    );
}
