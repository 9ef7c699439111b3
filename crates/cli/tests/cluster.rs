//! Replicas under faults, with the real `shopmesh up --replicas`: a killed inventory replica
//! during a stream of checkouts, a stopped (hung) one under read traffic; and instances
//! coming and going in a real etcd.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{BIN, Shop, free_port, signal, token};
use serde_json::{Value, json};

/// One at a time: these tests measure latency and shares, which a neighbour's load on two
/// cores would distort.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Rate limits off: the tests send more than one client's worth from one address.
const NO_LIMITS: [(&str, &str); 2] = [
    ("SHOPMESH_GATEWAY__RATE_LIMIT__PER_IP_PER_SECOND", "0"),
    ("SHOPMESH_GATEWAY__RATE_LIMIT__PER_USER_PER_SECOND", "0"),
];

/// An admin token, a customer token and a product with plenty of stock.
async fn stocked_shop(shop: &Shop, client: &reqwest::Client) -> (String, String, String) {
    let admin = Command::new(BIN)
        .args([
            "admin",
            "create-admin",
            "--email",
            "ops@example.com",
            "--password",
            "an admin passphrase",
        ])
        .current_dir(shop.dir.path())
        .output()
        .expect("create-admin");
    assert!(admin.status.success());
    let boss = token(client, shop, "ops@example.com", "an admin passphrase").await;
    let registered = client
        .post(shop.url("/api/v1/register"))
        .json(&json!({"email": "cat@example.com", "name": "Cat", "password": "correct horse battery"}))
        .send()
        .await
        .expect("register");
    assert_eq!(registered.status(), 201);
    let cat = token(client, shop, "cat@example.com", "correct horse battery").await;
    let product: Value = client
        .post(shop.url("/api/v1/products"))
        .bearer_auth(&boss)
        .json(&json!({"sku": "MESH-1", "name": "Mesh Bag", "price": 1500, "currency": "EUR", "category": "test"}))
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
        .json(&json!({"quantity": 50_000}))
        .send()
        .await
        .expect("stock");
    assert_eq!(stocked.status(), 200, "{:?}", stocked.text().await);
    (boss, cat, product)
}

/// A process's view of its upstreams, from its `/internal/mesh`.
async fn mesh_view(client: &reqwest::Client, addr: &str) -> Value {
    client
        .get(format!("http://{addr}/internal/mesh"))
        .send()
        .await
        .expect("mesh view")
        .json()
        .await
        .expect("json")
}

/// `url → requests` of one upstream in a mesh view.
fn requests_by_endpoint(view: &Value, upstream: &str) -> BTreeMap<String, u64> {
    view["upstreams"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|u| u["name"] == upstream)
        .flat_map(|u| u["endpoints"].as_array().cloned().unwrap_or_default())
        .map(|e| {
            (
                e["url"].as_str().unwrap_or_default().to_owned(),
                e["requests"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

fn percentile(mut samples: Vec<Duration>, p: f64) -> Duration {
    samples.sort();
    let i = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
    samples[i]
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_one_of_three_inventory_replicas_fails_no_checkout() {
    let _serial = SERIAL.lock().await;
    let shop = Shop::start_args(&["--replicas", "inventory=3", "--no-demo"], &NO_LIMITS);
    let client = reqwest::Client::new();
    let (_boss, cat, product) = stocked_shop(&shop, &client).await;
    let orders = shop.addr_of("orders");
    let before = requests_by_endpoint(&mesh_view(&client, &orders).await, "inventory");
    assert_eq!(
        before.len(),
        3,
        "orders sees three inventory replicas: {before:?}"
    );

    // A steady stream of checkouts, each with its own idempotency key. A failed first attempt
    // is retried by the client with the same key, as a shop's front end would.
    let stop = Arc::new(AtomicBool::new(false));
    let placed = Arc::new(AtomicUsize::new(0));
    let first_try_failures = Arc::new(AtomicUsize::new(0));
    let lost = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..4 {
        let (client, url, cat, product) = (
            client.clone(),
            shop.url("/api/v1/orders"),
            cat.clone(),
            product.clone(),
        );
        let (stop, placed, first_try_failures, lost) = (
            stop.clone(),
            placed.clone(),
            first_try_failures.clone(),
            lost.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let key = format!("w{w}-{n}");
                let mut ok = false;
                for attempt in 0..5 {
                    let status = client
                        .post(&url)
                        .bearer_auth(&cat)
                        .header("idempotency-key", &key)
                        .json(&json!({"items": [{"product_id": product, "quantity": 1}]}))
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                        .unwrap_or(0);
                    if status == 201 || status == 200 {
                        ok = true;
                        break;
                    }
                    if attempt == 0 {
                        first_try_failures.fetch_add(1, Ordering::SeqCst);
                        eprintln!("checkout {key}: first attempt answered {status}");
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                if ok {
                    placed.fetch_add(1, Ordering::SeqCst);
                } else {
                    lost.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }

    tokio::time::sleep(Duration::from_secs(3)).await;
    let victim_url = format!("http://{}", shop.addr_of("inventory-2"));
    let killed_at = Instant::now();
    signal(shop.pid_of("inventory-2"), "KILL");

    // The dead endpoint leaves orders' view (the launcher withdraws it from the registry).
    let gone_after = loop {
        let view = mesh_view(&client, &orders).await;
        if !requests_by_endpoint(&view, "inventory").contains_key(&victim_url) {
            break killed_at.elapsed();
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(10),
            "the killed replica is still in orders' view: {view}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // It comes back on a new port and gets checkouts again.
    let back_after = loop {
        let state = shop.state();
        let restarted = state["processes"]["inventory-2"]["restarts"] == 1;
        let url = format!(
            "http://{}",
            state["processes"]["inventory-2"]["addr"]
                .as_str()
                .unwrap_or_default()
        );
        let served = requests_by_endpoint(&mesh_view(&client, &orders).await, "inventory")
            .get(&url)
            .copied()
            .unwrap_or_default();
        if restarted && url != victim_url && served > 0 {
            break killed_at.elapsed();
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "the restarted replica never got traffic: {state}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.expect("worker");
    }

    let view = mesh_view(&client, &orders).await;
    let retried = view["upstreams"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|u| u["name"] == "inventory")
        .map(|u| u["retries"].clone())
        .unwrap_or_default();
    let placed = placed.load(Ordering::SeqCst);
    let first_try_failures = first_try_failures.load(Ordering::SeqCst);
    let lost = lost.load(Ordering::SeqCst);
    let total = placed + lost;
    let success = 1.0 - first_try_failures as f64 / total as f64;
    println!(
        "checkouts: {total}, first-attempt success {:.2}% ({first_try_failures} retried by the \
         client), lost {lost}; killed replica gone from orders' view after {gone_after:?}, \
         serving again after {back_after:?}; orders retried {retried} inventory calls",
        success * 100.0
    );
    assert_eq!(lost, 0, "a checkout failed even when retried with its key");
    assert!(success >= 0.995, "first-attempt success {success}");
    assert!(gone_after < Duration::from_secs(5), "{gone_after:?}");

    // Every placed order holds one unit: nothing doubled, nothing lost.
    let stock: Value = client
        .get(shop.url(&format!("/api/v1/inventory/{product}")))
        .send()
        .await
        .expect("stock")
        .json()
        .await
        .expect("json");
    assert_eq!(stock["reserved"], json!(placed), "{stock}");
}

/// Sends SIGCONT when dropped, so a failing test leaves no stopped process behind.
struct Resume(i32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// `requests` GETs over 4 connections; their latencies.
async fn read_load(client: &reqwest::Client, url: &str, requests: usize) -> Vec<Duration> {
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (client, url) = (client.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            for _ in 0..requests / 4 {
                let started = Instant::now();
                let status = client
                    .get(&url)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                latencies.push(started.elapsed());
                assert_eq!(status, 200);
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("load"));
    }
    all
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_replica_gets_little_traffic_and_the_gateway_p99_holds() {
    let _serial = SERIAL.lock().await;
    let shop = Shop::start_args(&["--replicas", "inventory=3", "--no-demo"], &NO_LIMITS);
    let client = reqwest::Client::new();
    let (boss, cat, product) = stocked_shop(&shop, &client).await;
    let url = shop.url(&format!("/api/v1/inventory/{product}"));
    // The cluster view is for admins only.
    let anonymous = client
        .get(shop.url("/api/v1/admin/cluster"))
        .send()
        .await
        .expect("cluster");
    assert_eq!(anonymous.status(), 401);
    let customer = client
        .get(shop.url("/api/v1/admin/cluster"))
        .bearer_auth(&cat)
        .send()
        .await
        .expect("cluster");
    assert_eq!(customer.status(), 403);
    let cluster = || {
        let (client, boss, url) = (
            client.clone(),
            boss.clone(),
            shop.url("/api/v1/admin/cluster"),
        );
        async move {
            let view: Value = client
                .get(url)
                .bearer_auth(boss)
                .send()
                .await
                .expect("cluster")
                .json()
                .await
                .expect("json");
            requests_by_endpoint(&view["gateway"], "inventory")
        }
    };

    // Warm up, then the healthy baseline.
    read_load(&client, &url, 400).await;
    let baseline = percentile(read_load(&client, &url, 3_000).await, 0.99);

    let victim = format!("http://{}", shop.addr_of("inventory-2"));
    let before = cluster().await;
    let pid = shop.pid_of("inventory-2");
    signal(pid, "STOP");
    let _resume = Resume(pid);
    let stopped = read_load(&client, &url, 3_000).await;
    let after = cluster().await;
    let with_stopped = percentile(stopped.clone(), 0.99);
    let slowest = stopped.iter().max().copied().unwrap_or_default();

    let delta =
        |url: &str| after.get(url).copied().unwrap_or(0) - before.get(url).copied().unwrap_or(0);
    let total: u64 = after.keys().map(|u| delta(u)).sum();
    let share = delta(&victim) as f64 / total as f64;
    println!(
        "p99 healthy {baseline:?}, with one replica stopped {with_stopped:?} (slowest \
         {slowest:?}); the stopped replica got {} of {total} calls ({:.2}%)",
        delta(&victim),
        share * 100.0
    );
    assert!(
        share < 0.10,
        "the stopped replica got {:.1}%",
        share * 100.0
    );
    assert!(
        with_stopped.as_secs_f64() <= 1.5 * baseline.as_secs_f64(),
        "p99 {with_stopped:?} vs healthy {baseline:?}"
    );
}

/// A real etcd on free loopback ports, killed when dropped.
struct Etcd {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    fn start() -> Etcd {
        let dir = tempfile::tempdir().expect("tempdir");
        let (client_port, peer_port) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let child = Command::new(etcd_bin_vendored::etcd_bin_path().expect("an etcd binary"))
            .args([
                "--name",
                "test",
                "--data-dir",
                &dir.path().join("etcd").display().to_string(),
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &format!("test={peer}"),
                "--log-level",
                "error",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn etcd");
        Etcd {
            child,
            url,
            _dir: dir,
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `shopmesh serve payments` registered in etcd with a 2 s lease.
fn payments_instance(
    etcd: &Etcd,
    dir: &std::path::Path,
    lease_secs: u64,
) -> (std::process::Child, String) {
    let port = free_port();
    let child = Command::new(BIN)
        .args(["serve", "payments"])
        .env("SHOPMESH_SERVER__PORT", port.to_string())
        .env("SHOPMESH_DATA_DIR", dir)
        .env("SHOPMESH_MESH__ETCD_URL", &etcd.url)
        .env("SHOPMESH_MESH__LEASE_TTL_SECS", lease_secs.to_string())
        .env("SHOPMESH_LOG__LEVEL", "warn")
        .spawn()
        .expect("spawn payments");
    (child, format!("http://127.0.0.1:{port}"))
}

/// Waits until the upstream's endpoints satisfy `test`; how long that took.
async fn until(
    upstream: &shopmesh_mesh::Upstream,
    limit: Duration,
    test: impl Fn(&[String]) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let urls: Vec<String> = upstream
            .endpoints()
            .iter()
            .map(|e| e.snapshot().url)
            .collect();
        if test(&urls) {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "endpoints now: {urls:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn instances_in_etcd_appear_and_a_dead_one_disappears_within_its_lease() {
    let _serial = SERIAL.lock().await;
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mesh = shopmesh_mesh::Mesh::new(shopmesh_mesh::MeshSettings {
        etcd_url: Some(etcd.url.clone()),
        ..Default::default()
    });
    let upstream = mesh
        .upstream("payments", "etcd:payments", shopmesh_mesh::Protocol::Grpc)
        .expect("upstream");

    let (mut first, first_url) = payments_instance(&etcd, dir.path(), 2);
    let appeared = until(&upstream, Duration::from_secs(20), |urls| {
        urls.contains(&first_url)
    })
    .await;

    // Killed: nobody revokes its lease; it runs out and the instance disappears.
    let killed = Instant::now();
    let _ = first.kill();
    let _ = first.wait();
    until(&upstream, Duration::from_secs(15), |urls| {
        !urls.contains(&first_url)
    })
    .await;
    let gone = killed.elapsed();

    // A new instance appears; stopped cleanly, it withdraws at once, long before its lease
    // (20 s) would run out.
    let (mut second, second_url) = payments_instance(&etcd, dir.path(), 20);
    let second_appeared = until(&upstream, Duration::from_secs(20), |urls| {
        urls == [second_url.clone()]
    })
    .await;
    let stopped = Instant::now();
    signal(second.id() as i32, "TERM");
    until(&upstream, Duration::from_secs(10), |urls| urls.is_empty()).await;
    let withdrawn = stopped.elapsed();
    let _ = second.wait();
    println!(
        "etcd: first instance seen after {appeared:?}; killed, gone after {gone:?} (lease 2 s); \
         second seen after {second_appeared:?}; stopped, gone after {withdrawn:?} (lease 20 s)"
    );
    // etcd expires leases in rounds and the watch reports it after; a loaded machine adds
    // more. Four times the lease tells expiry apart from anything slower.
    assert!(gone < Duration::from_secs(8), "{gone:?}");
    assert!(withdrawn < Duration::from_secs(5), "{withdrawn:?}");
}

/// Runs `shopmesh chaos` against `shop` with `args`; its exit status and standard output.
async fn chaos(shop: &Shop, args: &[&str]) -> (bool, String) {
    let mut command = std::process::Command::new(BIN);
    command
        .args(["chaos", "--url", &shop.gateway, "--quiet"])
        .args(["--admin-email", "ops@example.com"])
        .args(["--admin-password", "an admin passphrase"])
        .args(args)
        .current_dir(shop.dir.path())
        .stderr(Stdio::inherit());
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("shopmesh chaos");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    println!("{stdout}");
    (output.status.success(), stdout)
}

/// The percentage `shopmesh chaos` reports.
fn success_rate(report: &str) -> f64 {
    report
        .lines()
        .find_map(|line| {
            line.split("failed: ")
                .nth(1)?
                .split('%')
                .next()?
                .parse()
                .ok()
        })
        .expect("a success rate in the report")
}

/// Issue 11's scenario, shortened for CI: two instances of every service, customers buying
/// while `shopmesh chaos` kills, freezes, slows or restarts one instance every 4 s: almost every
/// journey succeeds with no client retry, and the books balance afterwards. Then rolling
/// restarts alone: not one journey fails.
#[tokio::test(flavor = "multi_thread")]
async fn chaos_against_two_instances_of_every_service_fails_almost_no_purchase() {
    let _serial = SERIAL.lock().await;
    let shop = Shop::start_args(
        &[
            "--replicas",
            "users=2,catalog=2,inventory=2,payments=2,orders=2,cart=2,notifications=2",
        ],
        // Each run of `chaos` logs its customers in afresh.
        &[
            NO_LIMITS[0],
            NO_LIMITS[1],
            ("SHOPMESH_GATEWAY__RATE_LIMIT__LOGIN_PER_MINUTE_PER_IP", "0"),
            (
                "SHOPMESH_GATEWAY__RATE_LIMIT__LOGIN_PER_MINUTE_PER_ACCOUNT",
                "0",
            ),
            // The latency fault's switch (every process listens on 127.0.0.1).
            ("SHOPMESH_SERVER__FAULT_INJECTION", "true"),
        ],
    );
    let client = reqwest::Client::new();
    stocked_shop(&shop, &client).await;

    let (ok, report) = chaos(
        &shop,
        &[
            "--users",
            "8",
            "--warmup",
            "2s",
            "--duration",
            "20s",
            "--every",
            "4s",
            "--faults",
            "kill,stop,term,latency",
            "--min-success",
            "99",
        ],
    )
    .await;
    assert!(ok, "kill, stop, term and latency: {report}");
    assert_eq!(
        report.matches(" errors for ").count(),
        4,
        "a fault at 4, 8, 12 and 16 s: {report}"
    );
    assert!(report.contains("verify: ok"), "{report}");

    let (ok, report) = chaos(
        &shop,
        &[
            "--users",
            "8",
            "--warmup",
            "1s",
            "--duration",
            "12s",
            "--every",
            "3s",
            "--faults",
            "term",
            "--min-success",
            "100",
        ],
    )
    .await;
    assert!(ok, "rolling restarts fail nothing: {report}");
    assert_eq!(success_rate(&report), 100.0, "{report}");
}
