//! System tests: the real `shopmesh up`, every service a real process, driven through the
//! gateway like a user would.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{BIN, Shop, alive, free_port, signal, token};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread")]
async fn the_shop_survives_a_killed_users_process_and_stops_cleanly() {
    let shop = Shop::start();
    let client = reqwest::Client::new();

    // Register and log in through the gateway.
    let registered = client
        .post(shop.url("/api/v1/register"))
        .json(&json!({"email": "zoe@example.com", "name": "Zoe", "password": "correct horse battery"}))
        .send()
        .await
        .expect("register");
    assert_eq!(registered.status(), 201);
    let zoe: Value = registered.json().await.expect("json");
    let old_token = token(&client, &shop, "zoe@example.com", "correct horse battery").await;

    // SIGKILL the users process; the launcher restarts it and nothing acknowledged is lost.
    let users = shop.pid_of("users");
    signal(users, "KILL");
    let started = Instant::now();
    let mut statuses = Vec::new();
    // Poll a read with the token we hold (polling /login would trip its rate limit: 5 per
    // minute per account, by design).
    loop {
        let status = client
            .get(shop.url("/api/v1/me"))
            .bearer_auth(&old_token)
            .send()
            .await
            .expect("me")
            .status();
        statuses.push(status.as_u16());
        if status == 200 {
            break;
        }
        assert!(
            status == 503 || status == 502,
            "while users is down the gateway says so: {status}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "users never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "back after {:?}; answers while down: {statuses:?}",
        started.elapsed()
    );
    // The launcher records the new process once its readiness probe sees it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while shop.pid_of("users") == users {
        assert!(
            Instant::now() < deadline,
            "up.json never showed the new users process"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(shop.state()["processes"]["users"]["restarts"], 1);
    // Logging in works again, with the password stored before the crash.
    token(&client, &shop, "zoe@example.com", "correct horse battery").await;
    // The token from before the crash still opens /me: same data, same signing key.
    let me = client
        .get(shop.url("/api/v1/me"))
        .bearer_auth(&old_token)
        .send()
        .await
        .expect("me");
    assert_eq!(me.status(), 200);
    let me: Value = me.json().await.expect("json");
    assert_eq!(me["id"], zoe["id"]);

    // An operator makes an admin beside the running shop.
    let admin = Command::new(BIN)
        .args([
            "admin",
            "create-admin",
            "--email",
            "boss@example.com",
            "--password",
            "an admin passphrase",
        ])
        .current_dir(shop.dir.path())
        .output()
        .expect("create-admin");
    assert!(
        admin.status.success(),
        "{}",
        String::from_utf8_lossy(&admin.stderr)
    );
    assert!(String::from_utf8_lossy(&admin.stdout).contains("created admin boss@example.com"));
    let boss = token(&client, &shop, "boss@example.com", "an admin passphrase").await;
    let users_list = client
        .get(shop.url("/api/v1/users"))
        .bearer_auth(&boss)
        .send()
        .await
        .expect("users");
    assert_eq!(users_list.status(), 200);
    let customer_list = client
        .get(shop.url("/api/v1/users"))
        .bearer_auth(&old_token)
        .send()
        .await
        .expect("users");
    assert_eq!(customer_list.status(), 403);

    // The demo catalog is there, through the gateway, for anyone.
    let page: Value = client
        .get(shop.url("/api/v1/products?category=books&limit=100"))
        .send()
        .await
        .expect("products")
        .json()
        .await
        .expect("json");
    assert_eq!(page["items"].as_array().expect("items").len(), 6, "{page}");
    // An admin adds a product; a customer may not.
    let new_product = json!({"sku": "SYS-1", "name": "System Test Mug", "price": 1500,
                             "currency": "EUR", "category": "kitchen"});
    let refused = client
        .post(shop.url("/api/v1/products"))
        .bearer_auth(&old_token)
        .json(&new_product)
        .send()
        .await
        .expect("create");
    assert_eq!(refused.status(), 403);
    let created = client
        .post(shop.url("/api/v1/products"))
        .bearer_auth(&boss)
        .json(&new_product)
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), 201);
    let found: Value = client
        .get(shop.url("/api/v1/products?q=system%20test"))
        .send()
        .await
        .expect("search")
        .json()
        .await
        .expect("json");
    assert_eq!(found["items"][0]["sku"], "SYS-1");
    let mug = found["items"][0]["id"].as_str().expect("id").to_owned();
    // Its stock, through the gateway: none, until the admin adds some.
    let stocked = client
        .post(shop.url(&format!("/api/v1/inventory/{mug}")))
        .bearer_auth(&boss)
        .json(&json!({"quantity": 12}))
        .send()
        .await
        .expect("stock");
    assert_eq!(stocked.status(), 200);
    let level: Value = client
        .get(shop.url(&format!("/api/v1/inventory/{mug}")))
        .send()
        .await
        .expect("level")
        .json()
        .await
        .expect("json");
    assert_eq!(level["available"], 12);
    // The demo products came with stock (KIT-001 starts with 25).
    let skillet: Value = client
        .get(shop.url("/api/v1/inventory/6e20fba7-3ef7-5811-a884-d72d3140dcae"))
        .send()
        .await
        .expect("level")
        .json()
        .await
        .expect("json");
    assert_eq!(skillet["available"], 25);
    // One OpenAPI document for the whole public API, complete when every service is up.
    let doc: Value = client
        .get(shop.url("/api/v1/openapi.json"))
        .send()
        .await
        .expect("openapi")
        .json()
        .await
        .expect("json");
    for path in [
        "/api/v1/register",
        "/api/v1/login",
        "/api/v1/products",
        "/api/v1/orders",
        "/api/v1/cart",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} documented");
    }
    assert!(
        !doc["info"]["description"]
            .as_str()
            .expect("description")
            .contains("incomplete")
    );

    // SIGTERM stops every process and exits cleanly.
    let children = [
        shop.pid_of("users"),
        shop.pid_of("catalog"),
        shop.pid_of("inventory"),
        shop.pid_of("payments"),
        shop.pid_of("gateway"),
    ];
    let launcher_pid = shop.launcher.id() as i32;
    signal(launcher_pid, "TERM");
    shop.wait_for_line("shopmesh up: stopped", Duration::from_secs(20));
    let mut shop = shop;
    let status = shop.launcher.wait().expect("wait");
    assert!(status.success(), "{status}");
    for pid in children {
        assert!(!alive(pid), "child {pid} outlived the launcher");
    }
    assert!(!shop.dir.path().join("data/up.json").exists());
}

/// The cores a process's threads may run on: every thread's `Cpus_allowed_list`, parsed.
#[cfg(target_os = "linux")]
fn cores_of(pid: i32) -> Vec<Vec<usize>> {
    let parse = |status: String| -> Vec<usize> {
        let list = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .expect("Cpus_allowed_list")
            .trim()
            .to_owned();
        list.split(',')
            .flat_map(|part| match part.split_once('-') {
                Some((a, b)) => (a.parse::<usize>().expect("core")
                    ..=b.parse::<usize>().expect("core"))
                    .collect::<Vec<_>>(),
                None => vec![part.parse().expect("core")],
            })
            .collect()
    };
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .map(parse)
        .collect()
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread")]
async fn every_process_runs_on_its_own_share_of_the_cores() {
    let allowed = cores_of(std::process::id() as i32).swap_remove(0);
    let services = [
        "users",
        "catalog",
        "inventory",
        "payments",
        "cart",
        "orders",
        "notifications",
        "gateway",
    ];
    let shop = Shop::start_with(&[("SHOPMESH_LAUNCHER__PIN_CORES", "true")]);
    let mut used = Vec::new();
    for service in services {
        let threads = cores_of(shop.pid_of(service));
        let cores = threads[0].clone();
        assert!(
            !cores.is_empty() && cores.iter().all(|c| allowed.contains(c)),
            "{service}: {cores:?} of {allowed:?}"
        );
        // Every thread: the set was taken before the runtime started any.
        assert!(
            threads.iter().all(|t| *t == cores),
            "{service}: {threads:?}"
        );
        if allowed.len() > 1 && allowed.len() <= services.len() {
            assert_eq!(cores.len(), 1, "{service}: one core each of {allowed:?}");
        }
        used.extend(cores);
    }
    used.sort_unstable();
    if allowed.len() > services.len() {
        assert_eq!(used, allowed, "disjoint shares of every core");
    } else {
        used.dedup();
        assert_eq!(used, allowed, "every core has a process");
    }
    drop(shop);

    let shop = Shop::start_with(&[("SHOPMESH_LAUNCHER__PIN_CORES", "false")]);
    for service in services {
        for cores in cores_of(shop.pid_of(service)) {
            assert_eq!(cores, allowed, "{service} left on any core");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn children_stop_when_the_launcher_is_killed() {
    let shop = Shop::start();
    let children = [
        shop.pid_of("users"),
        shop.pid_of("catalog"),
        shop.pid_of("inventory"),
        shop.pid_of("payments"),
        shop.pid_of("gateway"),
    ];
    signal(shop.launcher.id() as i32, "KILL");
    let deadline = Instant::now() + Duration::from_secs(15);
    while children.iter().any(|pid| alive(*pid)) {
        assert!(
            Instant::now() < deadline,
            "children outlived a SIGKILLed launcher"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_child_that_cannot_start_fails_up_with_its_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = Command::new(BIN)
        .args(["up", "--port", &free_port().to_string()])
        .current_dir(dir.path())
        .env("SHOPMESH_SERVER__PROT", "1")
        .output()
        .expect("run");
    assert!(!output.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(all.contains("failed to start"), "{all}");
    assert!(
        all.contains("prot"),
        "the child's own message names the bad key: {all}"
    );
}

/// The launcher checks a port is free, then its child binds it; anything can take the port in
/// between (a parallel launcher did, in CI). The child says so with its own exit status, on
/// which the launcher moves it to another port instead of stopping the shop.
#[test]
fn a_service_whose_port_is_taken_exits_with_the_address_in_use_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    let output = Command::new(BIN)
        .args(["serve", "payments"])
        .current_dir(dir.path())
        .env("SHOPMESH_DATA_DIR", dir.path())
        .env("SHOPMESH_SERVER__PORT", &port)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(98), "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    // Any other failure keeps the ordinary status.
    let output = Command::new(BIN)
        .args(["serve", "payments"])
        .current_dir(dir.path())
        .env("SHOPMESH_DATA_DIR", dir.path())
        .env("SHOPMESH_SERVER__PROT", "1")
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(1));
}

#[test]
fn help_explains_every_command() {
    for args in [
        vec!["--help"],
        vec!["up", "--help"],
        vec!["serve", "--help"],
        vec!["admin", "create-admin", "--help"],
    ] {
        let output = Command::new(BIN).args(&args).output().expect("run");
        assert!(output.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(text.contains("Usage:"), "{args:?}: {text}");
    }
    let serve = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&serve.stdout);
    assert!(
        [
            "users",
            "catalog",
            "inventory",
            "payments",
            "cart",
            "orders",
            "gateway"
        ]
        .iter()
        .all(|s| text.contains(s)),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_between_charge_and_commit_ends_paid_with_one_charge_and_one_commit() {
    crash_between_charge_and_commit(&[]).await;
}

mod postgres {
    /// The same crash, every service on its own PostgreSQL database.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_crash_between_charge_and_commit_ends_paid_with_one_charge_and_one_commit() {
        let services = [
            "users",
            "catalog",
            "inventory",
            "payments",
            "cart",
            "orders",
            "notifications",
        ];
        let Some((template, _dbs)) = shopmesh_db::testing::TestDb::postgres_family(&services).await
        else {
            return;
        };
        super::crash_between_charge_and_commit(&[(
            "SHOPMESH_LAUNCHER__DATABASE_URL_TEMPLATE",
            template.as_str(),
        )])
        .await;
    }
}

async fn crash_between_charge_and_commit(env: &[(&str, &str)]) {
    let mut env = env.to_vec();
    env.push(("SHOPMESH_ORDERS__FAILPOINT", "pause_after_charge"));
    let shop = Shop::start_with(&env);
    let client = reqwest::Client::new();
    let admin = Command::new(BIN)
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
    let boss = token(&client, &shop, "ops@example.com", "an admin passphrase").await;
    let registered = client
        .post(shop.url("/api/v1/register"))
        .json(&json!({"email": "cat@example.com", "name": "Cat", "password": "correct horse battery"}))
        .send()
        .await
        .expect("register");
    assert_eq!(registered.status(), 201);
    let cat = token(&client, &shop, "cat@example.com", "correct horse battery").await;

    let product: Value = client
        .post(shop.url("/api/v1/products"))
        .bearer_auth(&boss)
        .json(&json!({"sku": "CRASH-1", "name": "Crash Test Dummy", "price": 4200, "currency": "EUR", "category": "test"}))
        .send()
        .await
        .expect("product")
        .json()
        .await
        .expect("json");
    let product = product["id"].as_str().expect("id").to_owned();
    let stocked = client
        .post(shop.url(&format!("/api/v1/inventory/{product}")))
        .bearer_auth(&boss)
        .json(&json!({"quantity": 5}))
        .send()
        .await
        .expect("stock");
    assert_eq!(stocked.status(), 200);
    let order: Value = client
        .post(shop.url("/api/v1/orders"))
        .bearer_auth(&cat)
        .header("idempotency-key", "crash-order-1")
        .json(&json!({"items": [{"product_id": product, "quantity": 2}]}))
        .send()
        .await
        .expect("order")
        .json()
        .await
        .expect("json");
    assert_eq!(order["status"], "awaiting_payment", "{order}");
    let order_id = order["id"].as_str().expect("id").to_owned();

    // Pay; the orders process freezes right after the card is charged.
    let pay = {
        let client = client.clone();
        let url = shop.url(&format!("/api/v1/orders/{order_id}/pay"));
        let cat = cat.clone();
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(cat)
                .json(&json!({"card": {"number": "4242424242424242", "exp_month": 12, "exp_year": 2035, "cvc": "123"}}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    let marker = shop
        .dir
        .path()
        .join("data/orders-failpoint-pause_after_charge.fired");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "the failpoint never fired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let frozen = shop.pid_of("orders");
    signal(frozen, "KILL");
    let answer = pay.await.expect("join");
    println!("the interrupted payment request got: {answer:?}");
    assert!(
        !matches!(answer, Ok(200)),
        "the request cannot have succeeded: {answer:?}"
    );

    // The restarted orders process finds the charge and finishes the saga.
    let deadline = Instant::now() + Duration::from_secs(20);
    let final_order = loop {
        let current: Value = client
            .get(shop.url(&format!("/api/v1/orders/{order_id}")))
            .bearer_auth(&cat)
            .send()
            .await
            .expect("order")
            .json()
            .await
            .unwrap_or(Value::Null);
        if current["status"] == "paid" {
            break current;
        }
        assert!(
            Instant::now() < deadline,
            "the order never ended paid: {current}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_ne!(shop.pid_of("orders"), frozen, "a new process finished it");
    assert_eq!(final_order["card_last4"], "4242");

    // Stock committed once: 5 - 2 sold, nothing left reserved.
    let level: Value = client
        .get(shop.url(&format!("/api/v1/inventory/{product}")))
        .send()
        .await
        .expect("stock")
        .json()
        .await
        .expect("json");
    assert_eq!(
        (level["available"].as_i64(), level["reserved"].as_i64()),
        (Some(3), Some(0))
    );
    let mut inventory = shopmesh_proto::inventory::v1::inventory_client::InventoryClient::connect(
        format!("http://{}", shop.addr_of("inventory")),
    )
    .await
    .expect("inventory grpc");
    let books = inventory
        .get_stock(shopmesh_proto::inventory::v1::GetStockRequest {
            product_ids: vec![product.clone()],
        })
        .await
        .expect("stock")
        .into_inner()
        .stock
        .remove(0);
    assert_eq!(
        (books.sold, books.added, books.on_hand),
        (2, 5, 3),
        "{books:?}"
    );

    // Charged once: one capture of the order's total.
    let mut payments = shopmesh_proto::payments::v1::payments_client::PaymentsClient::connect(
        format!("http://{}", shop.addr_of("payments")),
    )
    .await
    .expect("payments grpc");
    let capture = payments
        .get_payment(shopmesh_proto::payments::v1::GetPaymentRequest {
            order_id: order_id.clone(),
        })
        .await
        .expect("captured")
        .into_inner();
    assert_eq!(
        (capture.amount, capture.status.as_str()),
        (8400, "captured")
    );
    // The books balance across services.
    let verify = Command::new(BIN)
        .args(["verify"])
        .envs(env.iter().copied())
        .current_dir(shop.dir.path())
        .output()
        .expect("verify");
    let report = String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(report.contains("1 paid"), "{report}");
    // A retried payment now answers `paid` without charging again.
    let retry = client
        .post(shop.url(&format!("/api/v1/orders/{order_id}/pay")))
        .bearer_auth(&cat)
        .json(&json!({"card": {"number": "4242424242424242", "exp_month": 12, "exp_year": 2035, "cvc": "123"}}))
        .send()
        .await
        .expect("retry");
    assert_eq!(retry.status(), 200);
}
