//! The public OpenAPI document, assembled by the gateway from the services' own documents.

use reqwest::Method;
use serde_json::Value;
use shopmesh_e2e::{Backend, Shop};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gateway_serves_one_openapi_document_for_every_service_behind_it() {
    let Some(shop) = Shop::start(Backend::Sqlite, &[]).await else {
        return;
    };
    let response = shop
        .send(Method::GET, "/api/v1/openapi.json", None, None, None)
        .await;
    assert_eq!(response.status(), 200);
    let doc: Value = response.json().await.expect("json");
    assert!(
        doc["openapi"].as_str().expect("version").starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().expect("paths");
    for (path, methods) in [
        ("/api/v1/products", &["get", "post"][..]),
        ("/api/v1/products/{id}", &["get", "put", "patch", "delete"]),
        ("/api/v1/inventory/{product_id}", &["get", "post", "delete"]),
        ("/api/v1/orders", &["get", "post"]),
        ("/api/v1/orders/{id}", &["get"]),
        ("/api/v1/orders/{id}/pay", &["post"]),
        ("/api/v1/orders/{id}/cancel", &["post"]),
        ("/api/v1/cart", &["get", "delete"]),
        ("/api/v1/cart/items", &["post"]),
        ("/api/v1/cart/items/{product_id}", &["put", "delete"]),
    ] {
        let item = paths
            .get(path)
            .unwrap_or_else(|| panic!("{path} is documented"));
        for method in methods {
            assert!(item.get(*method).is_some(), "{method} {path} is documented");
        }
    }
    let create = &paths["/api/v1/orders"]["post"];
    assert!(create["responses"].get("409").is_some() && create["responses"].get("201").is_some());
    let params = create["parameters"].as_array().expect("parameters");
    assert!(
        params
            .iter()
            .any(|p| p["name"] == "Idempotency-Key" && p["in"] == "header")
    );
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    for schema in [
        "ProblemBody",
        "ProductView",
        "OrderView",
        "CartView",
        "StockView",
    ] {
        assert!(schemas.contains_key(schema), "schema {schema}");
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    // The users service is not running in this harness: the document says so.
    let description = doc["info"]["description"].as_str().expect("description");
    assert!(
        description.contains("incomplete") && description.contains("users"),
        "{description}"
    );

    let page = shop
        .send(Method::GET, "/api/v1/docs", None, None, None)
        .await;
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .expect("type")
            .starts_with("text/html")
    );
    assert!(page.text().await.expect("html").contains("api-reference"));
}
