//! `shopmesh load`: the load generator every figure in bench/README comes from.
//!
//! It talks to the shop only through the gateway's public API, as customers do:
//! - **prepare**: reads the catalogue, tops up stock on every product it buys (admin token or
//!   credentials), registers and logs in its own customers;
//! - **closed loop** (`--users N`): N virtual customers, each repeating its scenario as soon as
//!   the previous iteration ended; what a shop with N busy customers sees;
//! - **open loop** (`--rate R`): purchases (order + pay) started at R per second whatever the
//!   shop's answers; each latency is measured from the *intended* start, so a stall counts
//!   against every purchase it delayed (no coordinated omission);
//! - per step: throughput, p50/p90/p99/p99.9/max from HDR histograms, errors by status; the CPU
//!   seconds and resident memory of every process of a `shopmesh up` on this machine (pids from
//!   `data/up.json`, figures from /proc), per journey;
//! - a JSON result (`--json`) and an HTML report (`--html`) with latency over time and
//!   percentile plots (SVG, drawn by plotters).
//!
//! A run is bounded: it stops after `--warmup` + `--duration` and waits at most 15 s more for
//! requests in flight (each gives up after 10 s). What started in the measured window counts,
//! however late it ends. Tokens are not refreshed: keep a run under their 15 minutes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::Rng;
use rand::seq::SliceRandom;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::time::Instant;

mod report;

/// Generates load against a running shop and reports throughput, latency and cost.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// The shop's address (the gateway).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Closed loop: this many virtual customers, each starting its next iteration when the
    /// previous one ended [default: 16, unless --rate is given].
    #[arg(long, conflicts_with = "rate")]
    users: Option<usize>,
    /// Open loop: start this many purchases (order + pay) per second, whatever the answers.
    #[arg(long)]
    rate: Option<f64>,
    /// What each virtual customer does.
    #[arg(long, value_enum, default_value_t = Scenario::Journey)]
    scenario: Scenario,
    /// Measured time, e.g. `30s`, `2m`.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
    /// Unmeasured time before it, under the same load.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    warmup: Duration,
    /// An admin's bearer token, to top up stock before the run.
    #[arg(long, env = "SHOPMESH_LOAD_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// An admin's e-mail (with --admin-password), to top up stock before the run.
    #[arg(long, env = "SHOPMESH_LOAD_ADMIN_EMAIL")]
    admin_email: Option<String>,
    /// The admin's password.
    #[arg(long, env = "SHOPMESH_LOAD_ADMIN_PASSWORD", hide_env_values = true)]
    admin_password: Option<String>,
    /// Units added to each product's stock before the run (needs an admin).
    #[arg(long, default_value_t = 50_000)]
    stock: i64,
    /// Customers the open loop spreads its purchases over.
    #[arg(long, default_value_t = 64)]
    customers: usize,
    /// Where `shopmesh up` keeps `up.json` (for per-process CPU and memory) [default: ./data,
    /// or SHOPMESH_DATA_DIR]; nothing is measured per process if it is absent.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write an HTML report (latency over time, percentiles) here.
    #[arg(long)]
    html: Option<PathBuf>,
    /// No live progress line.
    #[arg(long)]
    quiet: bool,
}

impl LoadArgs {
    /// Where `up.json` is looked for.
    pub(crate) fn data_dir(&self) -> Option<&PathBuf> {
        self.data_dir.as_ref()
    }

    /// The measured time.
    pub(crate) fn duration(&self) -> Duration {
        self.duration
    }
}

/// What a virtual customer repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
enum Scenario {
    /// List 20 products, order one unit of one, pay for it.
    Journey,
    /// A weighted shopping mix: browse, search, product page, cart, checkout from the cart,
    /// pay, a declined card, cancel, order history.
    Mix,
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(at) => s.split_at(at),
        None => (s, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration such as 30s, 2m or 500ms"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("{s:?}: the unit must be ms, s or m")),
    };
    if !(0.0..=86_400.0).contains(&seconds) {
        return Err(format!("{s:?}: must be between 0 and 24 h"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The settings that take the gateway's rate limits out of a benchmark (one client address
/// registers, logs in and buys for everyone).
const LIMITS_OFF: [&str; 4] = [
    "SHOPMESH_GATEWAY__RATE_LIMIT__PER_IP_PER_SECOND=0",
    "SHOPMESH_GATEWAY__RATE_LIMIT__PER_USER_PER_SECOND=0",
    "SHOPMESH_GATEWAY__RATE_LIMIT__LOGIN_PER_MINUTE_PER_IP=0",
    "SHOPMESH_GATEWAY__RATE_LIMIT__LOGIN_PER_MINUTE_PER_ACCOUNT=0",
];

/// A request with no answer after this long counts as failed ("no answer").
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP side: one pooled keep-alive client for the whole run.
#[derive(Clone)]
struct Shop {
    client: HttpClient,
    base: String,
}

/// An answer: status and body (empty on a transport error, status 0).
struct Answer {
    status: StatusCode,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

impl Shop {
    fn new(url: &str) -> Shop {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            // Under the servers' idle close (their header timeout, 10 s by default).
            .pool_idle_timeout(Duration::from_secs(5))
            .build(connector);
        Shop {
            client,
            base: format!("{}/api/v1", url.trim_end_matches('/')),
        }
    }

    /// One request; `Err` only when no HTTP answer came back.
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        idempotency_key: Option<&str>,
    ) -> Result<Answer, String> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if let Some(key) = idempotency_key {
            request = request.header("idempotency-key", key);
        }
        let body = match body {
            Some(body) => {
                request = request.header(http::header::CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(body).map_err(|e| e.to_string())?)
            }
            None => Bytes::new(),
        };
        let request = request.body(Full::new(body)).map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(CALL_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| format!("no answer within {CALL_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Answer { status, body })
    }

    /// A set-up call that must succeed; 429s are waited out.
    async fn must(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        for _ in 0..20 {
            let answer = self
                .call(method.clone(), path, token, body, None)
                .await
                .map_err(|e| anyhow::anyhow!("{method} {path}: {e}"))?;
            if answer.status == StatusCode::TOO_MANY_REQUESTS {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            if !answer.status.is_success() {
                bail!(
                    "{method} {path}: {} {}",
                    answer.status,
                    String::from_utf8_lossy(&answer.body)
                );
            }
            return Ok(answer.json());
        }
        bail!(
            "{method} {path}: still rate limited after 10 s; start the shop with the gateway's \
             limits off: {}",
            LIMITS_OFF.join(" ")
        )
    }
}

/// A customer of the run, logged in.
#[derive(Clone)]
struct Customer {
    token: Arc<str>,
}

/// What the run buys and browses.
struct Catalogue {
    products: Vec<String>,
    words: Vec<String>,
}

async fn prepare_catalogue(shop: &Shop, args: &LoadArgs) -> anyhow::Result<Catalogue> {
    let mut products = Vec::new();
    let mut words = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/products?limit=100&cursor={c}"),
            None => "/products?limit=100".to_owned(),
        };
        let page = shop.must(Method::GET, &path, None, None).await?;
        for item in page["items"].as_array().into_iter().flatten() {
            if let Some(id) = item["id"].as_str() {
                products.push(id.to_owned());
            }
            if let Some(word) = item["name"]
                .as_str()
                .and_then(|n| n.split_whitespace().find(|w| w.len() > 3))
            {
                words.push(word.to_lowercase());
            }
        }
        cursor = page["next_cursor"].as_str().map(str::to_owned);
        if cursor.is_none() || products.len() >= 1_000 {
            break;
        }
    }
    if products.is_empty() {
        bail!("the catalogue is empty: start the shop with its demo data, or add products");
    }
    let admin = match (&args.admin_token, &args.admin_email, &args.admin_password) {
        (Some(token), _, _) => Some(token.clone()),
        (None, Some(email), Some(password)) => Some(login(shop, email, password).await?),
        _ => None,
    };
    match admin {
        Some(admin) if args.stock > 0 => {
            for id in &products {
                shop.must(
                    Method::POST,
                    &format!("/inventory/{id}"),
                    Some(&admin),
                    Some(&json!({ "quantity": args.stock })),
                )
                .await
                .context("topping up stock (is the token an admin's?)")?;
            }
            eprintln!(
                "load: added {} units to each of {} products",
                args.stock,
                products.len()
            );
        }
        _ => eprintln!(
            "load: no admin given (--admin-email/--admin-password or --admin-token): stock is \
             not topped up, and purchases fail once it runs out"
        ),
    }
    Ok(Catalogue { products, words })
}

async fn login(shop: &Shop, email: &str, password: &str) -> anyhow::Result<String> {
    let answer = shop
        .must(
            Method::POST,
            "/login",
            None,
            Some(&json!({ "email": email, "password": password })),
        )
        .await?;
    answer["access_token"]
        .as_str()
        .map(str::to_owned)
        .context("login answered without an access_token")
}

async fn prepare_customers(shop: &Shop, n: usize) -> anyhow::Result<Vec<Customer>> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let run = &run[..8];
    let password = format!("load test {run} password");
    let mut customers = Vec::with_capacity(n);
    // A few at a time: each registration and login hashes a password (Argon2, one per core).
    for chunk in (0..n).collect::<Vec<_>>().chunks(4) {
        let mut batch = Vec::new();
        for &i in chunk {
            let shop = shop.clone();
            let password = password.clone();
            let email = format!("load-{run}-{i}@example.com");
            batch.push(tokio::spawn(async move {
                shop.must(
                    Method::POST,
                    "/register",
                    None,
                    Some(&json!({ "email": email, "name": format!("Load {i}"), "password": password })),
                )
                .await?;
                login(&shop, &email, &password).await
            }));
        }
        for task in batch {
            let token = task.await.context("a set-up task panicked")??;
            customers.push(Customer {
                token: token.into(),
            });
        }
    }
    Ok(customers)
}

/// Latency histograms and errors of one run, merged from every virtual customer.
struct Recorder {
    steps: BTreeMap<&'static str, Histogram<u64>>,
    /// `(step, status)`; status 0 is "no HTTP answer".
    errors: BTreeMap<(&'static str, u16), u64>,
    /// The whole iteration (journey, or purchase in the open loop), per second of the run.
    per_second: Vec<Histogram<u64>>,
    /// Failed steps, by the second of the run they failed in.
    failed_per_second: Vec<u64>,
    iterations: u64,
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant, valid bounds")
}

impl Recorder {
    fn new() -> Recorder {
        Recorder {
            steps: BTreeMap::new(),
            errors: BTreeMap::new(),
            per_second: Vec::new(),
            failed_per_second: Vec::new(),
            iterations: 0,
        }
    }

    fn step(&mut self, step: &'static str, micros: u64) {
        self.steps
            .entry(step)
            .or_insert_with(histogram)
            .saturating_record(micros.max(1));
    }

    fn error(&mut self, step: &'static str, status: u16, second: usize) {
        *self.errors.entry((step, status)).or_default() += 1;
        if self.failed_per_second.len() <= second {
            self.failed_per_second.resize(second + 1, 0);
        }
        self.failed_per_second[second] += 1;
    }

    fn iteration(&mut self, name: &'static str, second: usize, micros: u64) {
        self.step(name, micros);
        self.iterations += 1;
        while self.per_second.len() <= second {
            self.per_second.push(histogram());
        }
        self.per_second[second].saturating_record(micros.max(1));
    }

    fn merge(&mut self, other: Recorder) {
        for (step, h) in other.steps {
            let _ = self.steps.entry(step).or_insert_with(histogram).add(h);
        }
        for (key, n) in other.errors {
            *self.errors.entry(key).or_default() += n;
        }
        while self.per_second.len() < other.per_second.len() {
            self.per_second.push(histogram());
        }
        for (mine, theirs) in self.per_second.iter_mut().zip(other.per_second) {
            let _ = mine.add(theirs);
        }
        if self.failed_per_second.len() < other.failed_per_second.len() {
            self.failed_per_second
                .resize(other.failed_per_second.len(), 0);
        }
        for (mine, theirs) in self
            .failed_per_second
            .iter_mut()
            .zip(other.failed_per_second)
        {
            *mine += theirs;
        }
        self.iterations += other.iterations;
    }
}

/// What a step records: [`Recorder`] into histograms (a virtual customer's whole run), [`Samples`]
/// into a short list (one purchase of the open loop, replayed into the run's recorder when it
/// ends).
trait Record: Send {
    fn step(&mut self, step: &'static str, micros: u64);
    fn error(&mut self, step: &'static str, status: u16, second: usize);
    fn iteration(&mut self, name: &'static str, second: usize, micros: u64);
}

impl Record for Recorder {
    fn step(&mut self, step: &'static str, micros: u64) {
        Recorder::step(self, step, micros);
    }
    fn error(&mut self, step: &'static str, status: u16, second: usize) {
        Recorder::error(self, step, status, second);
    }
    fn iteration(&mut self, name: &'static str, second: usize, micros: u64) {
        Recorder::iteration(self, name, second, micros);
    }
}

/// One purchase's samples. A [`Recorder`] of its own per purchase would allocate (and merge) a
/// 140 KB histogram per step and one per second of the run so far: at 500 purchases/s that was
/// 1.5 ms of the load generator's CPU per purchase, taken from the shop it measures.
#[derive(Default)]
struct Samples(Vec<Sample>);

enum Sample {
    Step(&'static str, u64),
    Error(&'static str, u16, usize),
    Iteration(&'static str, usize, u64),
}

impl Record for Samples {
    fn step(&mut self, step: &'static str, micros: u64) {
        self.0.push(Sample::Step(step, micros));
    }
    fn error(&mut self, step: &'static str, status: u16, second: usize) {
        self.0.push(Sample::Error(step, status, second));
    }
    fn iteration(&mut self, name: &'static str, second: usize, micros: u64) {
        self.0.push(Sample::Iteration(name, second, micros));
    }
}

impl Recorder {
    fn replay(&mut self, samples: Samples) {
        for sample in samples.0 {
            match sample {
                Sample::Step(step, micros) => self.step(step, micros),
                Sample::Error(step, status, second) => self.error(step, status, second),
                Sample::Iteration(name, second, micros) => self.iteration(name, second, micros),
            }
        }
    }
}

/// Shared counters for the progress line.
#[derive(Default)]
struct Live {
    done: AtomicU64,
    errors: AtomicU64,
}

/// The measured window: what started in it is recorded, however late it ends (the slowest
/// answers are the ones that end after the window; leaving them out would flatter the tail).
#[derive(Clone, Copy)]
struct Window {
    from: Instant,
    until: Instant,
}

impl Window {
    fn records(&self, started: Instant) -> bool {
        started >= self.from && started < self.until
    }
    fn second(&self, started: Instant) -> usize {
        started.saturating_duration_since(self.from).as_secs() as usize
    }
}

/// One virtual customer's context for a step.
struct Session<'a> {
    shop: &'a Shop,
    customer: &'a Customer,
    recorder: &'a mut dyn Record,
    window: Window,
    started: Instant,
    live: &'a Live,
}

impl Session<'_> {
    /// Runs a step; `Ok(body)` on an expected status, `Err(())` after recording the error.
    async fn step(
        &mut self,
        name: &'static str,
        method: Method,
        path: &str,
        body: Option<&Value>,
        key: Option<&str>,
        expect: StatusCode,
    ) -> Result<Answer, ()> {
        let sent = Instant::now();
        let answer = self
            .shop
            .call(method, path, Some(&self.customer.token), body, key)
            .await;
        let now = Instant::now();
        let recorded = self.window.records(self.started);
        match answer {
            Ok(answer) if answer.status == expect => {
                if recorded {
                    self.recorder
                        .step(name, now.duration_since(sent).as_micros() as u64);
                }
                Ok(answer)
            }
            other => {
                let status = other.map_or(0, |a| a.status.as_u16());
                if recorded {
                    // Placed in time where it was seen, not where its iteration began.
                    self.recorder.error(name, status, self.window.second(now));
                    self.live.errors.fetch_add(1, Ordering::Relaxed);
                }
                Err(())
            }
        }
    }

    fn finish(&mut self, name: &'static str, from: Instant) {
        let now = Instant::now();
        if self.window.records(self.started) {
            let second = self.window.second(self.started);
            self.recorder
                .iteration(name, second, now.duration_since(from).as_micros() as u64);
            self.live.done.fetch_add(1, Ordering::Relaxed);
        }
    }
}

const GOOD_CARD: &str = "4242424242424242";
/// Most purchases the open loop keeps in flight.
const MAX_IN_FLIGHT: usize = 2_000;
/// The error "status" of a purchase not started because too many were in flight.
const NOT_SENT: u16 = 1;
const DECLINED_CARD: &str = "4000000000000002";

fn card(number: &str) -> Value {
    json!({ "card": { "number": number, "exp_month": 12, "exp_year": 2099, "cvc": "123" } })
}

/// Places an order under a fresh `Idempotency-Key` (`body`: lines, or from the cart) as step
/// `name`; its id.
async fn place(s: &mut Session<'_>, name: &'static str, body: &Value) -> Result<String, ()> {
    let key = uuid::Uuid::new_v4().to_string();
    let order = s
        .step(
            name,
            Method::POST,
            "/orders",
            Some(body),
            Some(&key),
            StatusCode::CREATED,
        )
        .await?;
    order.json()["id"].as_str().map(str::to_owned).ok_or(())
}

/// Pays order `id` with `number` as step `name`, expecting `expect`.
async fn pay(
    s: &mut Session<'_>,
    name: &'static str,
    id: &str,
    number: &str,
    expect: StatusCode,
) -> Result<(), ()> {
    let path = format!("/orders/{id}/pay");
    s.step(name, Method::POST, &path, Some(&card(number)), None, expect)
        .await
        .map(drop)
}

fn one_of(product: &str) -> Value {
    json!({ "items": [{ "product_id": product, "quantity": 1 }] })
}

/// Places an order for one unit of `product` and pays it: the purchase.
async fn purchase(s: &mut Session<'_>, product: &str) -> Result<(), ()> {
    let id = place(s, "order", &one_of(product)).await?;
    pay(s, "pay", &id, GOOD_CARD, StatusCode::OK).await
}

async fn journey(s: &mut Session<'_>, catalogue: &Catalogue) {
    let started = s.started;
    let product = pick(&catalogue.products);
    let ok = async {
        get(s, "list", "/products?limit=20").await?;
        purchase(s, &product).await
    }
    .await;
    if ok.is_ok() {
        s.finish("journey", started);
    }
}

fn pick(items: &[String]) -> String {
    items
        .choose(&mut rand::thread_rng())
        .cloned()
        .unwrap_or_default()
}

/// The weighted shopping mix: one action per iteration.
async fn mix(s: &mut Session<'_>, catalogue: &Catalogue) {
    let started = s.started;
    let product = pick(&catalogue.products);
    let roll = rand::thread_rng().gen_range(0..100);
    let line = json!({ "product_id": product, "quantity": 1 });
    let ok: Result<(), ()> = async {
        match roll {
            0..30 => get(s, "browse", "/products?limit=20").await,
            30..40 => {
                let word = pick(&catalogue.words);
                get(s, "search", &format!("/products?q={word}&limit=20")).await
            }
            40..60 => get(s, "product", &format!("/products/{product}")).await,
            60..70 => {
                send(s, "cart_add", Method::POST, "/cart/items", &line).await?;
                let quantity = json!({ "quantity": 2 });
                let path = format!("/cart/items/{product}");
                send(s, "cart_update", Method::PUT, &path, &quantity).await
            }
            70..76 => {
                send(s, "cart_add", Method::POST, "/cart/items", &line).await?;
                let id = place(s, "checkout", &json!({ "from_cart": true })).await?;
                pay(s, "pay", &id, GOOD_CARD, StatusCode::OK).await
            }
            76..86 => purchase(s, &product).await,
            86..89 => {
                let id = place(s, "order", &one_of(&product)).await?;
                pay(
                    s,
                    "declined",
                    &id,
                    DECLINED_CARD,
                    StatusCode::PAYMENT_REQUIRED,
                )
                .await?;
                cancel(s, &id).await
            }
            89..92 => {
                let id = place(s, "order", &one_of(&product)).await?;
                cancel(s, &id).await
            }
            _ => get(s, "history", "/orders?limit=20").await,
        }
    }
    .await;
    if ok.is_ok() {
        s.finish("iteration", started);
    }
}

/// A read that answers 200.
async fn get(s: &mut Session<'_>, name: &'static str, path: &str) -> Result<(), ()> {
    s.step(name, Method::GET, path, None, None, StatusCode::OK)
        .await
        .map(drop)
}

/// A change that answers 200.
async fn send(
    s: &mut Session<'_>,
    name: &'static str,
    method: Method,
    path: &str,
    body: &Value,
) -> Result<(), ()> {
    s.step(name, method, path, Some(body), None, StatusCode::OK)
        .await
        .map(drop)
}

async fn cancel(s: &mut Session<'_>, id: &str) -> Result<(), ()> {
    let path = format!("/orders/{id}/cancel");
    s.step("cancel", Method::POST, &path, None, None, StatusCode::OK)
        .await
        .map(drop)
}

/// CPU time and memory of one process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    cpu_ticks: u64,
    rss_kib: u64,
    /// Resident pages no other process maps (`Private_Clean` + `Private_Dirty`): what stopping
    /// this process would give back. Every process under `up` is the same binary, so its
    /// resident code (17 MiB of each RSS, measured) is counted in every RSS but held once.
    /// `None` when `smaps_rollup` cannot be read (another user's process).
    private_kib: Option<u64>,
}

fn usage(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let private_kib = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .map(|rollup| private_kib(&rollup));
    Some(Usage {
        cpu_ticks: utime + stime,
        rss_kib,
        private_kib,
    })
}

/// `Private_Clean` + `Private_Dirty` of an `smaps_rollup`, in KiB.
fn private_kib(rollup: &str) -> u64 {
    rollup
        .lines()
        .filter_map(|l| {
            l.strip_prefix("Private_Clean:")
                .or_else(|| l.strip_prefix("Private_Dirty:"))
        })
        .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn clock_ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

/// The shop's processes on this machine: `instance → pid` from `up.json` (and the launcher).
fn shop_processes(data_dir: Option<&PathBuf>) -> BTreeMap<String, u32> {
    let Ok(state) = crate::verify::up_state(data_dir, "--data-dir") else {
        return BTreeMap::new();
    };
    let mut pids = BTreeMap::new();
    if let Some(pid) = state["launcher_pid"].as_u64() {
        pids.insert("launcher".to_owned(), pid as u32);
    }
    for (name, process) in state["processes"].as_object().into_iter().flatten() {
        if let Some(pid) = process["pid"].as_u64() {
            pids.insert(name.clone(), pid as u32);
        }
    }
    pids
}

fn snapshot(pids: &BTreeMap<String, u32>) -> BTreeMap<String, Usage> {
    let mut all: BTreeMap<String, Usage> = pids
        .iter()
        .filter_map(|(name, pid)| Some((name.clone(), usage(*pid)?)))
        .collect();
    if let Some(me) = usage(std::process::id()) {
        all.insert("(load generator)".to_owned(), me);
    }
    all
}

/// The figures of one step.
#[derive(Debug, Serialize)]
struct StepResult {
    step: &'static str,
    count: u64,
    per_second: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    /// `[percentile, ms]` pairs for the percentile plot.
    #[serde(skip)]
    curve: Vec<(f64, f64)>,
}

#[derive(Debug, Serialize)]
struct ErrorResult {
    step: &'static str,
    /// 0: no HTTP answer; 1: not sent (too many in flight).
    status: u16,
    count: u64,
}

#[derive(Debug, Serialize)]
struct ProcessResult {
    process: String,
    cpu_seconds: f64,
    cpu_ms_per_iteration: f64,
    rss_mib: f64,
    /// Resident memory no other process shares (see [`Usage::private_kib`]); `None` when it
    /// could not be read.
    private_mib: Option<f64>,
}

#[derive(Debug, Serialize)]
struct SecondResult {
    second: usize,
    count: u64,
    /// Steps that failed in this second.
    errors: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// What `--json` writes.
#[derive(Debug, Serialize)]
pub(crate) struct LoadResult {
    url: String,
    scenario: Scenario,
    mode: &'static str,
    users: Option<usize>,
    rate: Option<f64>,
    duration_secs: f64,
    warmup_secs: f64,
    cores: usize,
    iteration: &'static str,
    pub iterations: u64,
    iterations_per_second: f64,
    pub errors: u64,
    steps: Vec<StepResult>,
    error_counts: Vec<ErrorResult>,
    processes: Vec<ProcessResult>,
    /// Summed over the shop's processes (not the load generator).
    shop_cpu_ms_per_iteration: Option<f64>,
    timeline: Vec<SecondResult>,
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

fn step_result(step: &'static str, h: &Histogram<u64>, seconds: f64) -> StepResult {
    let curve = [
        0.0, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 1.0,
    ]
    .iter()
    .map(|q| (*q * 100.0, ms(h.value_at_quantile(*q))))
    .collect();
    StepResult {
        step,
        count: h.len(),
        per_second: h.len() as f64 / seconds,
        p50_ms: ms(h.value_at_quantile(0.5)),
        p90_ms: ms(h.value_at_quantile(0.9)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
        curve,
    }
}

pub async fn run(args: LoadArgs) -> anyhow::Result<()> {
    run_with(&args, None).await.map(drop)
}

/// What a run measured, for `shopmesh chaos`.
pub(crate) struct Outcome {
    pub result: LoadResult,
    /// Successful iterations' latencies, per second of the measured window.
    pub per_second: Vec<Histogram<u64>>,
    /// Failed steps per second of the measured window.
    pub failed_per_second: Vec<u64>,
}

/// [`run`], telling `window` when the measured window opens, and answering with what it
/// measured.
pub(crate) async fn run_with(
    args: &LoadArgs,
    window_opens: Option<tokio::sync::oneshot::Sender<Instant>>,
) -> anyhow::Result<Outcome> {
    if let Some(rate) = args.rate
        && !(rate > 0.0 && rate <= 100_000.0)
    {
        bail!("--rate {rate}: expected 0 < rate ≤ 100000 purchases per second");
    }
    if args.duration.is_zero() {
        bail!("--duration must be more than 0");
    }
    let shop = Shop::new(&args.url);
    let catalogue = Arc::new(prepare_catalogue(&shop, args).await?);
    let users = args.users.unwrap_or(16).max(1);
    let customers = match args.rate {
        Some(_) => args.customers.max(1),
        None => users,
    };
    let customers = prepare_customers(&shop, customers).await?;
    let pids = shop_processes(args.data_dir.as_ref());
    if pids.is_empty() {
        eprintln!("load: no up.json found; CPU and memory per process are not measured");
    }

    let start = Instant::now();
    let window = Window {
        from: start + args.warmup,
        until: start + args.warmup + args.duration,
    };
    if let Some(opens) = window_opens {
        let _ = opens.send(window.from);
    }
    let live = Arc::new(Live::default());
    let progress = progress_bar(args, live.clone(), window);
    let measure = {
        let pids = pids.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(window.from).await;
            let before = snapshot(&pids);
            tokio::time::sleep_until(window.until).await;
            (before, snapshot(&pids))
        })
    };

    let (recorder, mode, iteration) = match args.rate {
        None => (
            closed_loop(
                &shop,
                &catalogue,
                &customers,
                users,
                args.scenario,
                window,
                &live,
            )
            .await,
            "closed",
            match args.scenario {
                Scenario::Journey => "journey",
                Scenario::Mix => "iteration",
            },
        ),
        Some(rate) => (
            open_loop(&shop, &catalogue, &customers, rate, window, &live).await,
            "open",
            "purchase",
        ),
    };
    if let Some(task) = progress {
        task.abort();
    }
    let (before, after) = measure.await.context("the measuring task panicked")?;

    let seconds = args.duration.as_secs_f64();
    let ticks = clock_ticks_per_second();
    let iterations = recorder.iterations.max(1) as f64;
    let processes: Vec<ProcessResult> = after
        .iter()
        .filter_map(|(name, end)| {
            let begin = before.get(name)?;
            let cpu_seconds = end.cpu_ticks.saturating_sub(begin.cpu_ticks) as f64 / ticks;
            Some(ProcessResult {
                process: name.clone(),
                cpu_seconds,
                cpu_ms_per_iteration: cpu_seconds * 1000.0 / iterations,
                rss_mib: end.rss_kib as f64 / 1024.0,
                private_mib: end.private_kib.map(|kib| kib as f64 / 1024.0),
            })
        })
        .collect();
    let shop_cpu: f64 = processes
        .iter()
        .filter(|p| !p.process.starts_with('('))
        .map(|p| p.cpu_ms_per_iteration)
        .sum();
    let mut steps: Vec<StepResult> = recorder
        .steps
        .iter()
        .map(|(step, h)| step_result(step, h, seconds))
        .collect();
    // The iteration last, like a total.
    steps.sort_by_key(|s| s.step == iteration);
    let result = LoadResult {
        url: args.url.clone(),
        scenario: args.scenario,
        mode,
        users: args.rate.is_none().then_some(users),
        rate: args.rate,
        duration_secs: seconds,
        warmup_secs: args.warmup.as_secs_f64(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        iteration,
        iterations: recorder.iterations,
        iterations_per_second: recorder.iterations as f64 / seconds,
        errors: recorder.errors.values().sum(),
        steps,
        error_counts: recorder
            .errors
            .iter()
            .map(|((step, status), count)| ErrorResult {
                step,
                status: *status,
                count: *count,
            })
            .collect(),
        shop_cpu_ms_per_iteration: (!pids.is_empty()).then_some(shop_cpu),
        processes,
        timeline: recorder
            .per_second
            .iter()
            .enumerate()
            .filter(|(second, _)| (*second as f64) < seconds)
            .map(|(second, h)| SecondResult {
                second,
                count: h.len(),
                errors: recorder.failed_per_second.get(second).copied().unwrap_or(0),
                p50_ms: ms(h.value_at_quantile(0.5)),
                p99_ms: ms(h.value_at_quantile(0.99)),
                max_ms: ms(h.max()),
            })
            .collect(),
    };
    print_result(&result);
    if let Some(path) = &args.json {
        write(path, &serde_json::to_vec_pretty(&result)?)?;
    }
    if let Some(path) = &args.html {
        write(path, report::html(&result)?.as_bytes())?;
    }
    Ok(Outcome {
        result,
        per_second: recorder.per_second,
        failed_per_second: recorder.failed_per_second,
    })
}

fn write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("load: wrote {}", path.display());
    Ok(())
}

fn progress_bar(
    args: &LoadArgs,
    live: Arc<Live>,
    window: Window,
) -> Option<tokio::task::JoinHandle<()>> {
    if args.quiet {
        return None;
    }
    let total = (args.warmup + args.duration).as_millis() as u64;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {elapsed:>3}/{duration} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let start = window.from - args.warmup;
    Some(tokio::spawn(async move {
        let mut last = (Instant::now(), 0u64);
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = Instant::now();
            let done = live.done.load(Ordering::Relaxed);
            let rate = (done - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
            last = (now, done);
            let phase = if now < window.from {
                "warm-up"
            } else {
                "measuring"
            };
            bar.set_position(now.duration_since(start).as_millis() as u64);
            bar.set_message(format!(
                "{phase}: {done} done, {rate:.0}/s, {} errors",
                live.errors.load(Ordering::Relaxed)
            ));
            if now >= window.until {
                bar.finish_and_clear();
                return;
            }
        }
    }))
}

async fn closed_loop(
    shop: &Shop,
    catalogue: &Arc<Catalogue>,
    customers: &[Customer],
    users: usize,
    scenario: Scenario,
    window: Window,
    live: &Arc<Live>,
) -> Recorder {
    let mut tasks = Vec::with_capacity(users);
    for user in 0..users {
        let shop = shop.clone();
        let catalogue = catalogue.clone();
        let customer = customers[user % customers.len()].clone();
        let live = live.clone();
        tasks.push(tokio::spawn(async move {
            let mut recorder = Recorder::new();
            while Instant::now() < window.until {
                let mut session = Session {
                    shop: &shop,
                    customer: &customer,
                    recorder: &mut recorder,
                    window,
                    started: Instant::now(),
                    live: &live,
                };
                match scenario {
                    Scenario::Journey => journey(&mut session, &catalogue).await,
                    Scenario::Mix => mix(&mut session, &catalogue).await,
                }
            }
            recorder
        }));
    }
    collect(tasks, window.until + Duration::from_secs(15)).await
}

/// Every virtual customer's figures; one still busy at `deadline` is left out.
async fn collect(tasks: Vec<tokio::task::JoinHandle<Recorder>>, deadline: Instant) -> Recorder {
    let mut all = Recorder::new();
    for task in tasks {
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(recorder)) => all.merge(recorder),
            Ok(Err(e)) => eprintln!("load: a virtual customer failed: {e}"),
            Err(_) => eprintln!("load: a virtual customer was still waiting 10 s after the end"),
        }
    }
    all
}

async fn open_loop(
    shop: &Shop,
    catalogue: &Arc<Catalogue>,
    customers: &[Customer],
    rate: f64,
    window: Window,
    live: &Arc<Live>,
) -> Recorder {
    let shared = Arc::new(Mutex::new(Recorder::new()));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let mut in_flight = tokio::task::JoinSet::new();
    let mut i: u32 = 0;
    loop {
        // The intended start of purchase i; late starts are measured from here.
        let intended = start + interval * i;
        if intended >= window.until {
            break;
        }
        tokio::time::sleep_until(intended).await;
        // Reap finished purchases so the set does not grow with the run.
        while in_flight.try_join_next().is_some() {}
        if in_flight.len() >= MAX_IN_FLIGHT {
            // The shop is far behind: count the purchase as failed rather than open ever more
            // connections.
            if window.records(intended) {
                if let Ok(mut all) = shared.lock() {
                    all.error("purchase", NOT_SENT, window.second(intended));
                }
                live.errors.fetch_add(1, Ordering::Relaxed);
            }
            i = i.saturating_add(1);
            continue;
        }
        let shop = shop.clone();
        let catalogue = catalogue.clone();
        let customer = customers[i as usize % customers.len()].clone();
        let live = live.clone();
        let shared = shared.clone();
        in_flight.spawn(async move {
            let mut samples = Samples::default();
            let product = pick(&catalogue.products);
            let mut session = Session {
                shop: &shop,
                customer: &customer,
                recorder: &mut samples,
                window,
                started: intended,
                live: &live,
            };
            if purchase(&mut session, &product).await.is_ok() {
                session.finish("purchase", intended);
            }
            if let Ok(mut all) = shared.lock() {
                all.replay(samples);
            }
        });
        i = i.saturating_add(1);
    }
    let _ = tokio::time::timeout(Duration::from_secs(15), async {
        while in_flight.join_next().await.is_some() {}
    })
    .await;
    // Still unanswered 15 s after the end (each call gives up after 10 s, so hardly ever):
    // failures, not left out.
    let unfinished = in_flight.len() as u64;
    in_flight.abort_all();
    if unfinished > 0
        && let Ok(mut all) = shared.lock()
    {
        *all.errors.entry(("purchase", 0)).or_default() += unfinished;
    }
    let mut all = Recorder::new();
    if let Ok(mut shared) = shared.lock() {
        std::mem::swap(&mut all, &mut shared);
    }
    all
}

fn print_result(r: &LoadResult) {
    let mode = match r.mode {
        "open" => format!("open loop at {:.0}/s", r.rate.unwrap_or_default()),
        _ => format!("closed loop, {} users", r.users.unwrap_or_default()),
    };
    println!(
        "\n{} scenario, {mode}, {:.0} s measured after {:.0} s warm-up, {} cores",
        match r.scenario {
            Scenario::Journey => "journey",
            Scenario::Mix => "mix",
        },
        r.duration_secs,
        r.warmup_secs,
        r.cores
    );
    println!(
        "{:<12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "step", "count", "per s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
    );
    for s in &r.steps {
        println!(
            "{:<12} {:>9} {:>9.1} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            s.step, s.count, s.per_second, s.p50_ms, s.p90_ms, s.p99_ms, s.p999_ms, s.max_ms
        );
    }
    if r.error_counts.is_empty() {
        println!("errors: 0");
    } else {
        println!("errors: {}", r.errors);
        for e in &r.error_counts {
            let status = match e.status {
                0 => "no answer".to_owned(),
                NOT_SENT => format!("not sent ({MAX_IN_FLIGHT} in flight)"),
                status => status.to_string(),
            };
            println!("  {:<12} {:>9}  {}", e.step, status, e.count);
        }
    }
    if !r.processes.is_empty() {
        println!(
            "{:<18} {:>9} {:>14} {:>9} {:>12}",
            "process",
            "CPU s",
            format!("ms/{}", r.iteration),
            "RSS MiB",
            "private MiB"
        );
        for p in &r.processes {
            println!(
                "{:<18} {:>9.2} {:>14.3} {:>9.1} {:>12}",
                p.process,
                p.cpu_seconds,
                p.cpu_ms_per_iteration,
                p.rss_mib,
                p.private_mib
                    .map_or_else(|| "-".to_owned(), |mib| format!("{mib:.1}"))
            );
        }
        if let Some(total) = r.shop_cpu_ms_per_iteration {
            println!("shop CPU per {}: {total:.3} ms", r.iteration);
        }
    }
    println!(
        "{}s: {:.1}/s ({} in {:.0} s), errors {}",
        r.iteration, r.iterations_per_second, r.iterations, r.duration_secs, r.errors
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn what_started_inside_the_window_is_recorded() {
        let from = Instant::now();
        let window = Window {
            from,
            until: from + Duration::from_secs(10),
        };
        assert!(window.records(from));
        assert!(window.records(from + Duration::from_millis(9_999)));
        assert!(!window.records(from - Duration::from_millis(1)));
        assert!(!window.records(from + Duration::from_secs(10)));
        assert_eq!(window.second(from + Duration::from_millis(2500)), 2);
    }

    #[test]
    fn merged_recorders_keep_every_sample_and_error() {
        let mut a = Recorder::new();
        a.iteration("journey", 0, 1_000);
        a.error("pay", 409, 0);
        let mut b = Recorder::new();
        b.iteration("journey", 2, 3_000);
        b.error("pay", 409, 4);
        b.error("order", 0, 0);
        a.merge(b);
        assert_eq!(a.iterations, 2);
        assert_eq!(a.steps["journey"].len(), 2);
        assert_eq!(a.per_second.len(), 3);
        assert_eq!(a.per_second[2].len(), 1);
        assert_eq!(a.errors[&("pay", 409)], 2);
        assert_eq!(a.errors[&("order", 0)], 1);
        assert_eq!(a.failed_per_second, [2, 0, 0, 0, 1]);
    }

    #[test]
    fn a_purchase_s_samples_replay_as_if_recorded_directly() {
        fn record(r: &mut dyn Record) {
            r.step("order", 700);
            r.error("pay", 502, 3);
            r.iteration("purchase", 3, 1_500);
            r.step("pay", 0);
        }
        let mut direct = Recorder::new();
        record(&mut direct);
        let mut samples = Samples::default();
        record(&mut samples);
        let mut replayed = Recorder::new();
        replayed.replay(samples);
        assert_eq!(replayed.iterations, 1);
        assert_eq!(replayed.steps.len(), direct.steps.len());
        for (step, h) in &direct.steps {
            assert_eq!(&replayed.steps[step], h, "{step}");
        }
        assert_eq!(replayed.per_second, direct.per_second);
        assert_eq!(replayed.per_second[3].max(), 1_500);
        assert_eq!(replayed.errors, direct.errors);
        assert_eq!(replayed.failed_per_second, [0, 0, 0, 1]);
    }

    #[test]
    fn our_own_process_usage_is_readable() {
        let me = usage(std::process::id()).expect("/proc/self");
        assert!(me.rss_kib > 0);
        assert!(me.private_kib.is_some_and(|kib| kib > 0), "{me:?}");
    }

    #[test]
    fn private_memory_is_the_clean_and_dirty_private_pages() {
        let rollup = "559231bb8000-7ffe3196e000 ---p 00000000 00:00 0   [rollup]\n\
                      Rss:               30124 kB\n\
                      Shared_Clean:      18552 kB\n\
                      Private_Clean:       628 kB\n\
                      Private_Dirty:     10944 kB\n";
        assert_eq!(private_kib(rollup), 11_572);
    }
}
