//! Events end to end with the real `shopmesh up` and its embedded transport: one message per
//! event, even when the consumer is killed between sending and recording.

/// What the tests that also write `.eml` files set (relative: under the data directory).
const MAIL_DIR: (&str, &str) = ("SHOPMESH_NOTIFICATIONS__MAIL_DIR", "mail");

mod common;

use std::time::{Duration, Instant};

use common::{BIN, Shop, signal, token};
use serde_json::{Value, json};

async fn admin_token(shop: &Shop, client: &reqwest::Client, env: &[(&str, &str)]) -> String {
    let admin = std::process::Command::new(BIN)
        .args([
            "admin",
            "create-admin",
            "--email",
            "ops@example.com",
            "--password",
            "an admin passphrase",
        ])
        .envs(env.iter().copied())
        .current_dir(shop.dir.path())
        .output()
        .expect("create-admin");
    assert!(admin.status.success());
    token(client, shop, "ops@example.com", "an admin passphrase").await
}

async fn register(shop: &Shop, client: &reqwest::Client, email: &str, name: &str) -> String {
    let registered = client
        .post(shop.url("/api/v1/register"))
        .json(&json!({"email": email, "name": name, "password": "correct horse battery"}))
        .send()
        .await
        .expect("register");
    assert_eq!(registered.status(), 201);
    token(client, shop, email, "correct horse battery").await
}

/// The messages the admin list shows, as (type, to); none while the service restarts.
async fn sent(shop: &Shop, client: &reqwest::Client, admin: &str) -> Vec<(String, String)> {
    let response = client
        .get(shop.url("/api/v1/admin/notifications?limit=500"))
        .bearer_auth(admin)
        .send()
        .await
        .expect("list");
    if response.status() != 200 {
        return Vec::new();
    }
    let list: Value = response.json().await.expect("json");
    list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|n| {
            (
                n["type"].as_str().unwrap_or_default().to_owned(),
                n["to"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Waits until `count` messages are listed, then a little longer to catch any duplicate.
async fn settle(
    shop: &Shop,
    client: &reqwest::Client,
    admin: &str,
    count: usize,
) -> Vec<(String, String)> {
    let started = Instant::now();
    while sent(shop, client, admin).await.len() < count {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "only {:?}",
            sent(shop, client, admin).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    sent(shop, client, admin).await
}

fn mail_files(shop: &Shop) -> Vec<String> {
    std::fs::read_dir(shop.dir.path().join("data/mail"))
        .expect("mail dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".eml"))
        .collect()
}

fn count(messages: &[(String, String)], kind: &str, to: &str) -> usize {
    messages
        .iter()
        .filter(|(k, t)| k == kind && t.contains(to))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_purchase_sends_one_confirmation_and_each_new_user_one_welcome() {
    purchase(&[]).await;
}

/// The same through RabbitMQ (`TEST_RABBITMQ_URL`, or the local broker; skipped with a notice
/// when there is none and none is required), on an exchange and queues of its own.
#[tokio::test(flavor = "multi_thread")]
async fn a_purchase_through_rabbitmq_sends_one_confirmation_and_each_new_user_one_welcome() {
    let configured = std::env::var("TEST_RABBITMQ_URL").ok();
    let url = configured
        .clone()
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    if let Err(e) = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await {
        assert!(
            configured.is_none(),
            "TEST_RABBITMQ_URL={url} is unreachable: {e}"
        );
        eprintln!("skipped: no RabbitMQ at {url}");
        return;
    }
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let exchange = format!("shopmesh-test.{unique}");
    let prefix = format!("shopmesh-test.{unique}.");
    purchase(&[
        ("SHOPMESH_EVENTS__RABBITMQ_URL", url.as_str()),
        ("SHOPMESH_EVENTS__EXCHANGE", exchange.as_str()),
        ("SHOPMESH_EVENTS__QUEUE_PREFIX", prefix.as_str()),
    ])
    .await;
    // Leave the broker as it was.
    let connection = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    for service in ["notifications", "catalog"] {
        for queue in [
            format!("{prefix}{service}"),
            format!("{prefix}{service}.dead"),
        ] {
            let _ = channel
                .queue_delete(queue.as_str().into(), Default::default())
                .await;
        }
    }
    for name in [exchange.clone(), format!("{exchange}.dead")] {
        let _ = channel
            .exchange_delete(name.as_str().into(), Default::default())
            .await;
    }
}

async fn purchase(env: &[(&str, &str)]) {
    let shop = Shop::start_with(env);
    let client = reqwest::Client::new();
    let admin = admin_token(&shop, &client, env).await;
    let cat = register(&shop, &client, "cat@example.com", "Cat").await;
    let _dog = register(&shop, &client, "dog@example.com", "Dog").await;

    let products: Value = client
        .get(shop.url("/api/v1/products?limit=1"))
        .send()
        .await
        .expect("products")
        .json()
        .await
        .expect("json");
    let product = products["items"][0]["id"].as_str().expect("id").to_owned();
    let order: Value = client
        .post(shop.url("/api/v1/orders"))
        .bearer_auth(&cat)
        .header("idempotency-key", "mail-1")
        .json(&json!({"items": [{"product_id": product, "quantity": 1}]}))
        .send()
        .await
        .expect("order")
        .json()
        .await
        .expect("json");
    let id = order["id"].as_str().expect("id").to_owned();
    let paid = client
        .post(shop.url(&format!("/api/v1/orders/{id}/pay")))
        .bearer_auth(&cat)
        .json(&json!({"card": {"number": "4242424242424242", "exp_month": 12, "exp_year": 2035, "cvc": "123"}}))
        .send()
        .await
        .expect("pay");
    assert_eq!(paid.status(), 200);

    // ops, cat, dog welcomed; cat's order placed and paid.
    let messages = settle(&shop, &client, &admin, 5).await;
    assert_eq!(messages.len(), 5, "{messages:?}");
    for who in ["ops@example.com", "cat@example.com", "dog@example.com"] {
        assert_eq!(count(&messages, "user.registered", who), 1, "{messages:?}");
    }
    assert_eq!(count(&messages, "order.placed", "cat@example.com"), 1);
    assert_eq!(count(&messages, "order.paid", "cat@example.com"), 1);
    // Each message's text is kept and served; no file is written unless asked for.
    let list: Value = client
        .get(shop.url("/api/v1/admin/notifications?limit=500"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    for item in list["items"].as_array().expect("items") {
        assert!(item.get("file").is_none(), "{item}");
        let url = item["message_url"].as_str().expect("message_url");
        let response = client
            .get(shop.url(url))
            .bearer_auth(&admin)
            .send()
            .await
            .expect("message");
        assert_eq!(response.status(), 200, "{url}");
        assert_eq!(response.headers()["content-type"], "message/rfc822");
        assert_eq!(response.headers()["cache-control"], "private, no-store");
        let event = item["event_id"].as_str().expect("event_id");
        assert_eq!(
            response.headers()["content-disposition"],
            format!("attachment; filename=\"{event}.eml\"").as_str()
        );
        let text = response.text().await.expect("text");
        let to = item["to"].as_str().expect("to");
        let subject = item["subject"].as_str().expect("subject");
        assert!(text.contains(&format!("To: {to}\r\n")), "{text}");
        assert!(text.contains(&format!("Subject: {subject}\r\n")), "{text}");
        assert!(
            text.contains(&format!("Message-ID: <{event}@shopmesh.local>")),
            "{text}"
        );
        // Customers cannot read each other's mail.
        let denied = client
            .get(shop.url(url))
            .bearer_auth(&cat)
            .send()
            .await
            .expect("message");
        assert_eq!(denied.status(), 403);
    }
    // A message recorded before texts were kept: listed with its file, no link, no text.
    let db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        shop.dir.path().join("data/notifications.db").display()
    ))
    .await
    .expect("notifications.db");
    sqlx::query(
        "INSERT INTO notifications (event_id, type, recipient, subject, file, created_at) \
         VALUES ('from-before', 'order.paid', 'Old <old@example.com>', 'Old', \
                 '/old/mail/from-before.eml', 1)",
    )
    .execute(&db)
    .await
    .expect("an old row");
    db.close().await;
    let list: Value = client
        .get(shop.url("/api/v1/admin/notifications?limit=500"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    let old = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|item| item["event_id"] == "from-before")
        .expect("the old row listed")
        .clone();
    assert_eq!(old["file"], "/old/mail/from-before.eml", "{old}");
    assert!(old.get("message_url").is_none(), "{old}");
    let unknown = client
        .get(shop.url("/api/v1/admin/notifications/from-before/message"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("message");
    assert_eq!(unknown.status(), 404);
    let unknown = client
        .get(shop.url("/api/v1/admin/notifications/no-such-event/message"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("message");
    assert_eq!(unknown.status(), 404);
    assert!(!shop.dir.path().join("data/mail").exists());

    // The list is for admins.
    let denied = client
        .get(shop.url("/api/v1/admin/notifications"))
        .bearer_auth(&cat)
        .send()
        .await
        .expect("list");
    assert_eq!(denied.status(), 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_killed_between_sending_and_recording_sends_the_message_once() {
    let env = [
        ("SHOPMESH_NOTIFICATIONS__FAILPOINT", "pause_after_mail"),
        MAIL_DIR,
    ];
    let shop = Shop::start_with(&env);
    let client = reqwest::Client::new();
    let admin = admin_token(&shop, &client, &env).await;

    // The first event (ops' registration): its message is written, then the consumer freezes
    // before recording it.
    let marker = shop
        .dir
        .path()
        .join("data/notifications-failpoint-pause_after_mail.fired");
    let started = Instant::now();
    while !marker.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the failpoint never fired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(mail_files(&shop).len(), 1, "written, not yet recorded");
    let frozen = shop.pid_of("notifications");
    signal(frozen, "KILL");

    // Restarted, it gets the event again: the same message, once.
    let _cat = register(&shop, &client, "cat@example.com", "Cat").await;
    let messages = settle(&shop, &client, &admin, 2).await;
    assert_ne!(shop.pid_of("notifications"), frozen);
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert_eq!(count(&messages, "user.registered", "ops@example.com"), 1);
    assert_eq!(count(&messages, "user.registered", "cat@example.com"), 1);
    assert_eq!(mail_files(&shop).len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_committed_order_event_arrives_though_the_producer_is_killed_mid_stream() {
    let shop = Shop::start_args(
        &["--no-demo"],
        &[
            ("SHOPMESH_GATEWAY__RATE_LIMIT__PER_IP_PER_SECOND", "0"),
            ("SHOPMESH_GATEWAY__RATE_LIMIT__PER_USER_PER_SECOND", "0"),
            // Files too: one per event however often the stream is re-read.
            MAIL_DIR,
        ],
    );
    let client = reqwest::Client::new();
    let admin = admin_token(&shop, &client, &[]).await;
    let cat = register(&shop, &client, "cat@example.com", "Cat").await;
    let product: Value = client
        .post(shop.url("/api/v1/products"))
        .bearer_auth(&admin)
        .json(&json!({"sku": "EV-1", "name": "Event Mug", "price": 900, "currency": "EUR", "category": "test"}))
        .send()
        .await
        .expect("product")
        .json()
        .await
        .expect("json");
    let product = product["id"].as_str().expect("id").to_owned();
    let stocked = client
        .post(shop.url(&format!("/api/v1/inventory/{product}")))
        .bearer_auth(&admin)
        .json(&json!({"quantity": 1000}))
        .send()
        .await
        .expect("stock");
    assert_eq!(stocked.status(), 200);

    // Orders placed one after another; the orders process is SIGKILLed in the middle (its
    // positioner and the stream it serves die with it). Failed requests are retried with their
    // key, as a client would.
    let mut placed = std::collections::BTreeSet::new();
    for n in 0..60 {
        if n == 30 {
            signal(shop.pid_of("orders"), "KILL");
        }
        let started = Instant::now();
        loop {
            let response = client
                .post(shop.url("/api/v1/orders"))
                .bearer_auth(&cat)
                .header("idempotency-key", format!("ev-{n}"))
                .json(&json!({"items": [{"product_id": product, "quantity": 1}]}))
                .send()
                .await
                .expect("order");
            if response.status() == 201 || response.status() == 200 {
                let order: Value = response.json().await.expect("json");
                placed.insert(order["id"].as_str().expect("id").to_owned());
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "order {n} never placed"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert_eq!(placed.len(), 60);

    // ops and cat welcomed, and one `order.placed` message per order: none lost, none twice.
    let messages = settle(&shop, &client, &admin, 62).await;
    assert_eq!(
        count(&messages, "order.placed", "cat@example.com"),
        60,
        "{messages:?}"
    );
    assert_eq!(messages.len(), 62);
    assert_eq!(mail_files(&shop).len(), 62);
}
