//! Black-box tests of the catalog: a real server on port 0, a fresh database per test, tokens
//! from a test issuer's JWKS. Every test runs on SQLite and on PostgreSQL.

use std::net::SocketAddr;

use reqwest::{Client, Response};
use serde_json::{Value, json};
use shopmesh_catalog::{Application, Config};
use shopmesh_config::Sources;
use shopmesh_db::testing::TestDb;
use shopmesh_proto::catalog::v1::GetProductsRequest;
use shopmesh_proto::catalog::v1::catalog_client::CatalogClient;
use shopmesh_testkit::{Issuer, assert_problem};
use tokio::sync::oneshot;

shopmesh_db::test_on_both_backends!(
    an_admin_creates_a_product_and_anyone_reads_it,
    only_admins_change_the_catalog,
    a_duplicate_sku_is_a_409,
    bad_input_names_the_field_and_stores_nothing,
    lists_search_filter_sort_and_page_without_gaps_or_repeats,
    bad_list_parameters_are_400s_naming_the_parameter,
    inactive_products_leave_lists_but_stay_readable,
    lists_may_be_reused_for_a_second_but_not_a_page_without_availability,
    put_replaces_and_patch_amends,
    a_deleted_product_is_gone_from_the_api_but_known_to_grpc_as_not_purchasable,
    grpc_get_products_prices_known_ids_and_skips_unknown_ones,
    the_demo_catalog_is_seeded_once,
);

struct TestApp {
    addr: SocketAddr,
    client: Client,
    issuer: Issuer,
    admin: String,
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
        .expect("build catalog");
    let addr = app.local_addr().expect("addr");
    let (stop, rx) = oneshot::channel::<()>();
    tokio::spawn(app.run_until(async {
        let _ = rx.await;
    }));
    let (_, admin) = issuer.admin();
    TestApp {
        addr,
        client: Client::new(),
        issuer,
        admin,
        _db: db,
        _stop: stop,
    }
}

async fn start(db: TestDb) -> TestApp {
    start_with(db, &[]).await
}

fn product(sku: &str, name: &str, price: i64, category: &str) -> Value {
    json!({
        "sku": sku, "name": name, "description": format!("About {name}"),
        "price": price, "currency": "EUR", "category": category,
        "image_url": "https://cdn.example.com/p.png"
    })
}

impl TestApp {
    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Response {
        let mut request = self.client.request(method, self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        request.send().await.expect("request")
    }

    async fn create(&self, body: &Value) -> Value {
        let response = self
            .send(
                reqwest::Method::POST,
                "/api/v1/products",
                Some(&self.admin),
                Some(body),
            )
            .await;
        assert_eq!(response.status(), 201, "create {body}");
        response.json().await.expect("json")
    }

    async fn list(&self, query: &str) -> Value {
        let response = self
            .send(
                reqwest::Method::GET,
                &format!("/api/v1/products{query}"),
                None,
                None,
            )
            .await;
        assert_eq!(response.status(), 200, "list {query}");
        response.json().await.expect("json")
    }

    /// Every page of a list, following cursors; the SKUs in order.
    async fn walk(&self, query: &str) -> Vec<String> {
        let mut skus = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let q = match &cursor {
                Some(c) => format!("{query}&cursor={c}"),
                None => query.to_owned(),
            };
            let page = self.list(&q).await;
            for item in page["items"].as_array().expect("items") {
                skus.push(item["sku"].as_str().expect("sku").to_owned());
            }
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => return skus,
            }
        }
    }
}

async fn an_admin_creates_a_product_and_anyone_reads_it(db: TestDb) {
    let app = start(db).await;
    let response = app
        .send(
            reqwest::Method::POST,
            "/api/v1/products",
            Some(&app.admin),
            Some(&product("kit-9", "Cast Iron Pan", 3490, "Kitchen")),
        )
        .await;
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    let created: Value = response.json().await.expect("json");
    assert_eq!(created["sku"], "KIT-9");
    assert_eq!(created["category"], "kitchen");
    assert_eq!(created["price"], 3490);
    assert_eq!(created["currency"], "EUR");
    assert_eq!(created["active"], true);
    assert_eq!(
        location,
        format!("/api/v1/products/{}", created["id"].as_str().expect("id"))
    );
    let read = app.send(reqwest::Method::GET, &location, None, None).await;
    assert_eq!(read.status(), 200);
    let read: Value = read.json().await.expect("json");
    assert_eq!(read, created);
}

async fn only_admins_change_the_catalog(db: TestDb) {
    let app = start(db).await;
    let body = product("A-1", "Anything", 100, "misc");
    let anonymous = app
        .send(reqwest::Method::POST, "/api/v1/products", None, Some(&body))
        .await;
    assert_problem(anonymous, 401, "unauthenticated", None).await;
    let (_, customer) = app.issuer.customer();
    let customer_try = app
        .send(
            reqwest::Method::POST,
            "/api/v1/products",
            Some(&customer),
            Some(&body),
        )
        .await;
    assert_problem(customer_try, 403, "forbidden", None).await;
    let created = app.create(&body).await;
    let path = format!("/api/v1/products/{}", created["id"].as_str().expect("id"));
    for method in [reqwest::Method::PUT, reqwest::Method::PATCH] {
        let r = app
            .send(method, &path, Some(&customer), Some(&json!({"price": 1})))
            .await;
        assert_eq!(r.status(), 403);
    }
    let r = app
        .send(reqwest::Method::DELETE, &path, Some(&customer), None)
        .await;
    assert_eq!(r.status(), 403);
    let unchanged: Value = app
        .send(reqwest::Method::GET, &path, None, None)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(unchanged["price"], 100);
}

async fn a_duplicate_sku_is_a_409(db: TestDb) {
    let app = start(db).await;
    app.create(&product("DUP-1", "First", 100, "misc")).await;
    let again = app
        .send(
            reqwest::Method::POST,
            "/api/v1/products",
            Some(&app.admin),
            Some(&product("dup-1", "Second", 200, "misc")),
        )
        .await;
    assert_problem(again, 409, "sku_taken", Some("sku")).await;
}

async fn bad_input_names_the_field_and_stores_nothing(db: TestDb) {
    let app = start(db).await;
    let post = |body: Value| {
        let app = &app;
        async move {
            app.send(
                reqwest::Method::POST,
                "/api/v1/products",
                Some(&app.admin),
                Some(&body),
            )
            .await
        }
    };
    let mut negative = product("B-1", "Bad", 100, "misc");
    negative["price"] = json!(-5);
    assert_problem(post(negative).await, 422, "invalid_price", Some("price")).await;
    let mut fractional = product("B-1", "Bad", 100, "misc");
    fractional["price"] = json!(19.99);
    assert_problem(post(fractional).await, 400, "invalid_field", Some("price")).await;
    let mut with_id = product("B-1", "Bad", 100, "misc");
    with_id["id"] = json!("0190b4e2-0000-7000-8000-000000000000");
    assert_problem(post(with_id).await, 400, "unknown_field", Some("id")).await;
    let mut no_name = product("B-1", "Bad", 100, "misc");
    no_name.as_object_mut().expect("object").remove("name");
    assert_problem(post(no_name).await, 400, "missing_field", Some("name")).await;
    let mut currency = product("B-1", "Bad", 100, "misc");
    currency["currency"] = json!("EURO");
    assert_problem(
        post(currency).await,
        422,
        "invalid_currency",
        Some("currency"),
    )
    .await;
    let mut image = product("B-1", "Bad", 100, "misc");
    image["image_url"] = json!("javascript:alert(1)");
    assert_problem(
        post(image).await,
        422,
        "invalid_image_url",
        Some("image_url"),
    )
    .await;
    let mut huge = product("B-1", "Bad", 100, "misc");
    huge["price"] = json!(i64::MAX);
    assert_problem(post(huge).await, 422, "invalid_price", Some("price")).await;
    assert_eq!(app.list("").await["items"], json!([]), "nothing was stored");
}

async fn lists_search_filter_sort_and_page_without_gaps_or_repeats(db: TestDb) {
    let app = start(db).await;
    // Two products share a name and two share a price, to exercise the keyset tie-breaker.
    for (sku, name, price, category) in [
        ("K1", "Skillet", 3490, "kitchen"),
        ("K2", "Chef Knife", 5900, "kitchen"),
        ("K3", "Cutting Board", 2950, "kitchen"),
        ("K4", "Skillet", 2950, "kitchen"),
        ("B1", "Rust Book", 3995, "books"),
        ("B2", "Database Internals", 4100, "books"),
        ("B3", "100% Pure Reading", 1000, "books"),
    ] {
        app.create(&product(sku, name, price, category)).await;
    }
    let by_name = app.walk("?limit=2").await;
    assert_eq!(by_name.len(), 7, "{by_name:?}");
    let mut sorted = by_name.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 7, "no repeats: {by_name:?}");
    assert_eq!(&by_name[..2], ["B3", "K2"], "{by_name:?}");

    let cheapest_first = app.walk("?sort=price&limit=3").await;
    assert_eq!(cheapest_first.first().map(String::as_str), Some("B3"));
    assert_eq!(cheapest_first.last().map(String::as_str), Some("K2"));
    assert_eq!(cheapest_first.len(), 7);
    let dearest_first = app.walk("?sort=-price&limit=3").await;
    let mut reversed = cheapest_first.clone();
    reversed.reverse();
    assert_eq!(dearest_first, reversed, "ties break on id both ways");
    let z_to_a = app.walk("?sort=-name&limit=4").await;
    let mut a_to_z = by_name.clone();
    a_to_z.reverse();
    assert_eq!(z_to_a, a_to_z);

    let kitchen = app.walk("?category=kitchen&limit=2").await;
    assert_eq!(kitchen.len(), 4);
    assert!(kitchen.iter().all(|s| s.starts_with('K')));
    let search = app.walk("?q=SKILL&limit=10").await;
    assert_eq!(search.len(), 2, "case-insensitive name match: {search:?}");
    let in_description = app.walk("?q=about%20rust&limit=10").await;
    assert_eq!(in_description, ["B1"]);
    let literal_percent = app.walk("?q=100%25&limit=10").await;
    assert_eq!(
        literal_percent,
        ["B3"],
        "% in the query is a literal, not a wildcard"
    );
    let underscore = app.walk("?q=_&limit=10").await;
    assert!(underscore.is_empty(), "_ is a literal too: {underscore:?}");
    // Search text of three characters and more is found through the search index, shorter
    // text by walking the list: both page, filter and sort alike.
    assert_eq!(
        app.walk("?q=skillet&sort=-price&limit=1").await,
        ["K1", "K4"]
    );
    assert_eq!(
        app.walk("?q=sk&category=kitchen&sort=price&limit=1").await,
        ["K4", "K1"]
    );
    assert_eq!(app.walk("?q=bOoK&category=books&limit=1").await, ["B1"]);
}

async fn bad_list_parameters_are_400s_naming_the_parameter(db: TestDb) {
    let app = start(db).await;
    let get = |q: &'static str| {
        let app = &app;
        async move {
            app.send(
                reqwest::Method::GET,
                &format!("/api/v1/products{q}"),
                None,
                None,
            )
            .await
        }
    };
    assert_problem(get("?limit=101").await, 400, "invalid_limit", Some("limit")).await;
    assert_problem(get("?limit=-1").await, 400, "invalid_query", Some("limit")).await;
    assert_problem(get("?sort=rating").await, 422, "invalid_sort", Some("sort")).await;
    assert_problem(
        get("?cursor=garbage").await,
        400,
        "invalid_cursor",
        Some("cursor"),
    )
    .await;
    assert_problem(
        get("?category=no%20spaces").await,
        422,
        "invalid_category",
        Some("category"),
    )
    .await;
    assert_problem(
        get("?colour=red").await,
        400,
        "invalid_query",
        Some("colour"),
    )
    .await;
    // A cursor from one sort order is refused by another.
    for sku in ["X1", "X2"] {
        app.create(&product(sku, sku, 100, "misc")).await;
    }
    let page = app.list("?limit=1&sort=price").await;
    let cursor = page["next_cursor"].as_str().expect("cursor").to_owned();
    let mixed = app
        .send(
            reqwest::Method::GET,
            &format!("/api/v1/products?sort=name&cursor={cursor}"),
            None,
            None,
        )
        .await;
    assert_problem(mixed, 400, "invalid_cursor", Some("cursor")).await;
    let malformed_id = app
        .send(reqwest::Method::GET, "/api/v1/products/42", None, None)
        .await;
    assert_problem(malformed_id, 400, "invalid_path_parameter", Some("id")).await;
}

async fn inactive_products_leave_lists_but_stay_readable(db: TestDb) {
    let app = start(db).await;
    let mut body = product("OFF-1", "Paused", 100, "misc");
    body["active"] = json!(false);
    let created = app.create(&body).await;
    app.create(&product("ON-1", "Selling", 100, "misc")).await;
    assert_eq!(app.walk("?limit=10").await, ["ON-1"]);
    let read = app
        .send(
            reqwest::Method::GET,
            &format!("/api/v1/products/{}", created["id"].as_str().expect("id")),
            None,
            None,
        )
        .await;
    assert_eq!(read.status(), 200);
    assert_eq!(read.json::<Value>().await.expect("json")["active"], false);
}

async fn lists_may_be_reused_for_a_second_but_not_a_page_without_availability(db: TestDb) {
    // Nothing listens on port 9: the inventory cannot answer.
    let app = start_with(
        db,
        &[("SHOPMESH_CATALOG__INVENTORY_URL", "http://127.0.0.1:9")],
    )
    .await;
    let created = app.create(&product("C-1", "Cached", 100, "misc")).await;
    let list = app
        .send(reqwest::Method::GET, "/api/v1/products", None, None)
        .await;
    assert_eq!(
        list.headers()["cache-control"],
        "public, max-age=1, stale-while-revalidate=1"
    );
    // No inventory answers in this test: the page goes without availability, and such a
    // degraded page must not be kept in place of a good one.
    let page = app
        .send(
            reqwest::Method::GET,
            &format!("/api/v1/products/{}", created["id"].as_str().expect("id")),
            None,
            None,
        )
        .await;
    assert_eq!(page.status(), 200);
    assert!(page.headers().get("cache-control").is_none());
}

async fn put_replaces_and_patch_amends(db: TestDb) {
    let app = start(db).await;
    let created = app.create(&product("P-1", "Original", 1000, "misc")).await;
    let path = format!("/api/v1/products/{}", created["id"].as_str().expect("id"));
    let patched = app
        .send(
            reqwest::Method::PATCH,
            &path,
            Some(&app.admin),
            Some(&json!({"price": 1200, "name": "Renamed"})),
        )
        .await;
    assert_eq!(patched.status(), 200);
    let patched: Value = patched.json().await.expect("json");
    assert_eq!(patched["price"], 1200);
    assert_eq!(patched["name"], "Renamed");
    assert_eq!(patched["sku"], "P-1", "untouched fields stay");
    // Search follows changes (the search index is kept by the database, issue 9).
    assert_eq!(app.walk("?q=renamed&limit=5").await, ["P-1"]);
    assert_eq!(
        app.walk("?q=original&limit=5").await,
        ["P-1"],
        "still in the description"
    );
    let redescribed = app
        .send(
            reqwest::Method::PATCH,
            &path,
            Some(&app.admin),
            Some(&json!({"description": "Plain"})),
        )
        .await;
    assert_eq!(redescribed.status(), 200);
    assert!(app.walk("?q=original&limit=5").await.is_empty());

    let bad_patch = app
        .send(
            reqwest::Method::PATCH,
            &path,
            Some(&app.admin),
            Some(&json!({"price": -1})),
        )
        .await;
    assert_problem(bad_patch, 422, "invalid_price", Some("price")).await;
    let unknown = app
        .send(
            reqwest::Method::PATCH,
            &path,
            Some(&app.admin),
            Some(&json!({"stock": 5})),
        )
        .await;
    assert_problem(unknown, 400, "unknown_field", Some("stock")).await;

    let replaced = app
        .send(
            reqwest::Method::PUT,
            &path,
            Some(&app.admin),
            Some(&product("P-2", "Replaced", 999, "other")),
        )
        .await;
    assert_eq!(replaced.status(), 200);
    let replaced: Value = replaced.json().await.expect("json");
    assert_eq!(replaced["sku"], "P-2");
    assert_eq!(replaced["category"], "other");
    assert_eq!(replaced["id"], created["id"]);
    let partial_put = app
        .send(
            reqwest::Method::PUT,
            &path,
            Some(&app.admin),
            Some(&json!({"price": 5})),
        )
        .await;
    assert_problem(partial_put, 400, "missing_field", None).await;

    let missing = app
        .send(
            reqwest::Method::PATCH,
            &format!("/api/v1/products/{}", uuid::Uuid::now_v7()),
            Some(&app.admin),
            Some(&json!({"price": 1})),
        )
        .await;
    assert_problem(missing, 404, "product_not_found", None).await;
}

async fn a_deleted_product_is_gone_from_the_api_but_known_to_grpc_as_not_purchasable(db: TestDb) {
    let app = start(db).await;
    let created = app.create(&product("DEL-1", "Doomed", 100, "misc")).await;
    let id = created["id"].as_str().expect("id").to_owned();
    let path = format!("/api/v1/products/{id}");
    assert_eq!(
        app.send(reqwest::Method::DELETE, &path, Some(&app.admin), None)
            .await
            .status(),
        204
    );
    assert_problem(
        app.send(reqwest::Method::GET, &path, None, None).await,
        404,
        "product_not_found",
        None,
    )
    .await;
    assert_problem(
        app.send(reqwest::Method::DELETE, &path, Some(&app.admin), None)
            .await,
        404,
        "product_not_found",
        None,
    )
    .await;
    assert_eq!(app.list("").await["items"], json!([]));
    let mut grpc = CatalogClient::connect(format!("http://{}", app.addr))
        .await
        .expect("connect");
    let products = grpc
        .get_products(GetProductsRequest {
            ids: vec![id.clone()],
        })
        .await
        .expect("get")
        .into_inner()
        .products;
    assert_eq!(products.len(), 1);
    assert!(!products[0].purchasable);
    assert_eq!(
        products[0].price, 100,
        "past orders can still show what it cost"
    );
}

async fn grpc_get_products_prices_known_ids_and_skips_unknown_ones(db: TestDb) {
    let app = start(db).await;
    let a = app.create(&product("G-1", "One", 1234, "misc")).await;
    let b = app.create(&product("G-2", "Two", 99, "misc")).await;
    let mut grpc = CatalogClient::connect(format!("http://{}", app.addr))
        .await
        .expect("connect");
    let ids = vec![
        a["id"].as_str().expect("id").to_owned(),
        b["id"].as_str().expect("id").to_owned(),
        uuid::Uuid::now_v7().to_string(),
    ];
    let mut products = grpc
        .get_products(GetProductsRequest { ids })
        .await
        .expect("get")
        .into_inner()
        .products;
    products.sort_by(|x, y| x.sku.cmp(&y.sku));
    assert_eq!(products.len(), 2);
    assert_eq!(
        (
            products[0].sku.as_str(),
            products[0].price,
            products[0].currency.as_str()
        ),
        ("G-1", 1234, "EUR")
    );
    assert!(products[0].purchasable);
    let invalid = grpc
        .get_products(GetProductsRequest {
            ids: vec!["nope".into()],
        })
        .await
        .expect_err("invalid");
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
}

async fn the_demo_catalog_is_seeded_once(db: TestDb) {
    let url = db.url_string();
    let app = start_with(db, &[("SHOPMESH_CATALOG__SEED_DEMO", "true")]).await;
    let all = app.walk("?limit=100").await;
    assert_eq!(all.len(), 30);
    let categories = app.list("?category=books&limit=100").await;
    assert_eq!(categories["items"].as_array().expect("items").len(), 6);
    // A second process on the same database (a restart, or a replica) adds nothing.
    let issuer = Issuer::start().await;
    let sources = Sources::empty()
        .set("SHOPMESH_SERVER__PORT", "0")
        .set("SHOPMESH_DATABASE__URL", url)
        .set("SHOPMESH_AUTH__JWKS_URL", issuer.jwks_url())
        .set("SHOPMESH_CATALOG__SEED_DEMO", "true");
    let again = Application::build(Config::load(&sources).expect("config"))
        .await
        .expect("build");
    drop(again);
    assert_eq!(app.walk("?limit=100").await.len(), 30);
}
