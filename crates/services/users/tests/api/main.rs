//! Black-box tests of the users service: a real server on port 0, a fresh database per test.
//! Every test runs twice: on SQLite and on PostgreSQL (see `shopmesh_db::testing` for when the
//! PostgreSQL variant may be skipped and when it must run).

mod helpers;

use helpers::{TestApp, config};
use serde_json::{Value, json};
use shopmesh_auth::{AuthSettings, JwkSet, Verifier};
use shopmesh_db::testing::TestDb;
use shopmesh_proto::users::v1::GetUserRequest;
use shopmesh_proto::users::v1::users_client::UsersClient;
use shopmesh_testkit::assert_problem;

shopmesh_db::test_on_both_backends!(
    register_returns_201_with_the_user_and_never_the_password_hash,
    an_email_differing_only_in_case_is_a_duplicate_409,
    concurrent_registrations_of_one_email_create_exactly_one_account,
    register_rejects_role_and_other_unknown_fields_with_400,
    register_rejects_malformed_json_missing_fields_and_non_json,
    register_rejects_an_invalid_email_or_weak_password_with_422_naming_the_field,
    login_returns_a_bearer_token_that_opens_me,
    wrong_password_and_unknown_email_get_the_same_401,
    protected_routes_need_a_valid_token,
    a_customer_sees_only_their_own_account,
    listing_users_is_for_admins_and_pages_with_a_cursor,
    a_malformed_user_id_is_a_400_naming_it,
    grpc_get_user_returns_the_account_or_not_found,
    the_jwks_verifies_issued_tokens,
    accounts_and_the_signing_key_survive_a_restart,
    the_bootstrap_admin_is_created_from_configuration,
    a_customer_who_registered_the_bootstrap_address_first_is_not_made_admin,
    readyz_reports_the_database,
);

async fn register_returns_201_with_the_user_and_never_the_password_hash(db: TestDb) {
    let app = TestApp::start(db).await;
    let response = app
        .register("Ann@Example.com", "correct horse battery")
        .await;
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    let text = response.text().await.expect("body");
    assert!(!text.contains("argon2"), "{text}");
    assert!(!text.to_lowercase().contains("password"), "{text}");
    let user: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(user["email"], "ann@example.com");
    assert_eq!(user["name"], "Test User");
    assert_eq!(user["role"], "customer");
    assert!(user["created_at"].is_string());
    let id = user["id"].as_str().expect("id");
    assert_eq!(
        uuid::Uuid::parse_str(id).expect("uuid").get_version_num(),
        7
    );
    assert_eq!(location, format!("/api/v1/users/{id}"));
}

async fn an_email_differing_only_in_case_is_a_duplicate_409(db: TestDb) {
    let app = TestApp::start(db).await;
    assert_eq!(
        app.register("bob@example.com", "correct horse battery")
            .await
            .status(),
        201
    );
    let again = app
        .register(" BOB@example.com", "another good secret")
        .await;
    assert_problem(again, 409, "email_taken", Some("email")).await;
    // The first account's password still works: nothing was overwritten.
    app.token("bob@example.com", "correct horse battery").await;
}

async fn concurrent_registrations_of_one_email_create_exactly_one_account(db: TestDb) {
    let app = TestApp::start(db).await;
    let attempts = (0..8).map(|_| app.register("race@example.com", "correct horse battery"));
    let statuses: Vec<u16> = futures_util::future::join_all(attempts)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 409).count(),
        7,
        "{statuses:?}"
    );
}

async fn register_rejects_role_and_other_unknown_fields_with_400(db: TestDb) {
    let app = TestApp::start(db).await;
    let response = app
        .post_json(
            "/api/v1/register",
            &json!({"email": "eve@example.com", "name": "Eve", "password": "correct horse battery", "role": "admin"}),
        )
        .await;
    assert_problem(response, 400, "unknown_field", Some("role")).await;
    // Nothing was stored: the address is still free.
    assert_eq!(
        app.register("eve@example.com", "correct horse battery")
            .await
            .status(),
        201
    );
}

async fn register_rejects_malformed_json_missing_fields_and_non_json(db: TestDb) {
    let app = TestApp::start(db).await;
    let malformed = app
        .client
        .post(app.url("/api/v1/register"))
        .header("content-type", "application/json")
        .body(r#"{"email": "a@example.com", "#)
        .send()
        .await
        .expect("send");
    assert_problem(malformed, 400, "invalid_json", None).await;

    let missing = app
        .post_json(
            "/api/v1/register",
            &json!({"email": "a@example.com", "name": "A"}),
        )
        .await;
    assert_problem(missing, 400, "missing_field", Some("password")).await;

    let wrong_type = app
        .post_json(
            "/api/v1/register",
            &json!({"email": 42, "name": "A", "password": "x"}),
        )
        .await;
    assert_problem(wrong_type, 400, "invalid_field", Some("email")).await;

    let form = app
        .client
        .post(app.url("/api/v1/register"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("email=a@example.com")
        .send()
        .await
        .expect("send");
    assert_problem(form, 415, "unsupported_media_type", None).await;
}

async fn register_rejects_an_invalid_email_or_weak_password_with_422_naming_the_field(db: TestDb) {
    let app = TestApp::start(db).await;
    let bad_email = app.register("not-an-email", "correct horse battery").await;
    assert_problem(bad_email, 422, "invalid_email", Some("email")).await;
    let short = app.register("carol@example.com", "short").await;
    let body = assert_problem(short, 422, "weak_password", Some("password")).await;
    assert!(
        body["detail"]
            .as_str()
            .expect("detail")
            .contains("8 characters"),
        "{body}"
    );
    let common = app.register("carol@example.com", "Password123").await;
    assert_problem(common, 422, "weak_password", Some("password")).await;
    let long = app.register("carol@example.com", &"x1".repeat(65)).await;
    assert_problem(long, 422, "weak_password", Some("password")).await;
    let blank_name = app
        .post_json(
            "/api/v1/register",
            &json!({"email": "carol@example.com", "name": "  ", "password": "correct horse battery"}),
        )
        .await;
    assert_problem(blank_name, 422, "invalid_name", Some("name")).await;
}

async fn login_returns_a_bearer_token_that_opens_me(db: TestDb) {
    let app = TestApp::start(db).await;
    app.register("dan@example.com", "correct horse battery")
        .await;
    let response = app.login("DAN@example.com", "correct horse battery").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 900);
    let token = body["access_token"].as_str().expect("token");
    let me = app.get("/api/v1/me", Some(token)).await;
    assert_eq!(me.status(), 200);
    let me: Value = me.json().await.expect("json");
    assert_eq!(me["email"], "dan@example.com");
}

async fn wrong_password_and_unknown_email_get_the_same_401(db: TestDb) {
    let app = TestApp::start(db).await;
    app.register("erin@example.com", "correct horse battery")
        .await;
    let wrong = app.login("erin@example.com", "wrong horse battery").await;
    let wrong = assert_problem(wrong, 401, "invalid_credentials", None).await;
    let unknown = app
        .login("nobody@example.com", "correct horse battery")
        .await;
    let unknown = assert_problem(unknown, 401, "invalid_credentials", None).await;
    assert_eq!(wrong, unknown, "the two failures must be indistinguishable");
}

async fn protected_routes_need_a_valid_token(db: TestDb) {
    let app = TestApp::start(db).await;
    let anonymous = app.get("/api/v1/me", None).await;
    assert_eq!(anonymous.headers()["www-authenticate"], "Bearer");
    assert_problem(anonymous, 401, "unauthenticated", None).await;
    let garbage = app.get("/api/v1/me", Some("not.a.token")).await;
    assert_problem(garbage, 401, "invalid_token", None).await;
    let (_, token) = app.signed_up("fay@example.com").await;
    let mut tampered = token.clone();
    tampered.pop();
    tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
    assert_problem(
        app.get("/api/v1/me", Some(&tampered)).await,
        401,
        "invalid_token",
        None,
    )
    .await;
    assert_eq!(app.get("/api/v1/users", None).await.status(), 401);
}

async fn a_customer_sees_only_their_own_account(db: TestDb) {
    let app = TestApp::start(db).await;
    let (gus, gus_token) = app.signed_up("gus@example.com").await;
    let (hal, _) = app.signed_up("hal@example.com").await;
    let own = app
        .get(&format!("/api/v1/users/{gus}"), Some(&gus_token))
        .await;
    assert_eq!(own.status(), 200);
    let other = app
        .get(&format!("/api/v1/users/{hal}"), Some(&gus_token))
        .await;
    let body = assert_problem(other, 404, "user_not_found", None).await;
    assert!(!body.to_string().contains("hal@"), "{body}");
    let nobody = app
        .get(
            &format!("/api/v1/users/{}", uuid::Uuid::now_v7()),
            Some(&gus_token),
        )
        .await;
    assert_problem(nobody, 404, "user_not_found", None).await;
}

async fn listing_users_is_for_admins_and_pages_with_a_cursor(db: TestDb) {
    let config = config(&db, &[]);
    let outcome = shopmesh_users::create_admin(
        &config,
        "root@example.com",
        "Root",
        "an admin passphrase".into(),
    )
    .await
    .expect("create admin");
    assert_eq!(outcome, shopmesh_users::AdminOutcome::Created);
    let app = TestApp::start_with(db, config).await;
    let (_, customer) = app.signed_up("ivy@example.com").await;
    app.signed_up("jon@example.com").await;
    let forbidden = app.get("/api/v1/users", Some(&customer)).await;
    assert_problem(forbidden, 403, "forbidden", None).await;

    let admin = app.token("root@example.com", "an admin passphrase").await;
    let first = app.get("/api/v1/users?limit=2", Some(&admin)).await;
    assert_eq!(first.status(), 200);
    let first: Value = first.json().await.expect("json");
    assert_eq!(first["items"].as_array().expect("items").len(), 2);
    assert_eq!(first["items"][0]["role"], "admin");
    let cursor = first["next_cursor"].as_str().expect("a next page");
    let second: Value = app
        .get(
            &format!("/api/v1/users?limit=2&cursor={cursor}"),
            Some(&admin),
        )
        .await
        .json()
        .await
        .expect("json");
    let emails: Vec<&str> = second["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|u| u["email"].as_str().expect("email"))
        .collect();
    assert_eq!(emails, ["jon@example.com"]);
    assert!(second["next_cursor"].is_null());

    let too_many = app.get("/api/v1/users?limit=101", Some(&admin)).await;
    assert_problem(too_many, 400, "invalid_limit", Some("limit")).await;
    let bad_cursor = app.get("/api/v1/users?cursor=nope", Some(&admin)).await;
    assert_problem(bad_cursor, 400, "invalid_query", Some("cursor")).await;
    // An admin may read anyone.
    let jon = &second["items"][0]["id"];
    let read = app
        .get(
            &format!("/api/v1/users/{}", jon.as_str().expect("id")),
            Some(&admin),
        )
        .await;
    assert_eq!(read.status(), 200);
}

async fn a_malformed_user_id_is_a_400_naming_it(db: TestDb) {
    let app = TestApp::start(db).await;
    let (_, token) = app.signed_up("kim@example.com").await;
    let response = app.get("/api/v1/users/12345", Some(&token)).await;
    assert_problem(response, 400, "invalid_path_parameter", Some("id")).await;
}

async fn grpc_get_user_returns_the_account_or_not_found(db: TestDb) {
    let app = TestApp::start(db).await;
    let (id, _) = app.signed_up("lee@example.com").await;
    let mut client = UsersClient::connect(format!("http://{}", app.addr))
        .await
        .expect("grpc connect");
    let user = client
        .get_user(GetUserRequest { id: id.clone() })
        .await
        .expect("get user")
        .into_inner()
        .user
        .expect("user");
    assert_eq!(user.id, id);
    assert_eq!(user.email, "lee@example.com");
    assert_eq!(user.role, "customer");
    let missing = client
        .get_user(GetUserRequest {
            id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .expect_err("not found");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let malformed = client
        .get_user(GetUserRequest { id: "x".into() })
        .await
        .expect_err("invalid");
    assert_eq!(malformed.code(), tonic::Code::InvalidArgument);
}

async fn the_jwks_verifies_issued_tokens(db: TestDb) {
    let app = TestApp::start(db).await;
    let (id, token) = app.signed_up("max@example.com").await;
    let jwks: JwkSet = app
        .get("/.well-known/jwks.json", None)
        .await
        .json()
        .await
        .expect("jwks");
    assert_eq!(jwks.keys.len(), 1);
    assert_eq!(jwks.keys[0].crv, "Ed25519");
    let verifier =
        Verifier::from_jwks_url(&AuthSettings::default(), app.url("/.well-known/jwks.json"));
    let claims = verifier
        .verify(&token)
        .await
        .expect("token verifies with the JWKS");
    assert_eq!(claims.sub.to_string(), id);
    let header = jsonwebtoken::decode_header(&token).expect("header");
    assert_eq!(header.alg, jsonwebtoken::Algorithm::EdDSA);
    assert_eq!(header.kid.as_deref(), Some(jwks.keys[0].kid.as_str()));
}

async fn accounts_and_the_signing_key_survive_a_restart(db: TestDb) {
    let app = TestApp::start(db).await;
    let (id, token) = app.signed_up("ned@example.com").await;
    let db = app.stop().await;
    let app = TestApp::start(db).await;
    // A token issued before the restart is still valid: the key was not regenerated.
    let me = app.get("/api/v1/me", Some(&token)).await;
    assert_eq!(me.status(), 200);
    let me: Value = me.json().await.expect("json");
    assert_eq!(me["id"], id.as_str());
    app.token("ned@example.com", "correct horse battery").await;
}

async fn the_bootstrap_admin_is_created_from_configuration(db: TestDb) {
    let config = config(
        &db,
        &[
            ("SHOPMESH_USERS__BOOTSTRAP_ADMIN_EMAIL", "ops@example.com"),
            (
                "SHOPMESH_USERS__BOOTSTRAP_ADMIN_PASSWORD",
                "bootstrap secret 1",
            ),
        ],
    );
    let app = TestApp::start_with(db, config.clone()).await;
    let token = app.token("ops@example.com", "bootstrap secret 1").await;
    assert_eq!(app.get("/api/v1/users", Some(&token)).await.status(), 200);
    // A restart with the same configuration keeps the one account.
    let db = app.stop().await;
    let app = TestApp::start_with(db, config).await;
    let token = app.token("ops@example.com", "bootstrap secret 1").await;
    let list: Value = app
        .get("/api/v1/users", Some(&token))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(list["items"].as_array().expect("items").len(), 1);
}

async fn a_customer_who_registered_the_bootstrap_address_first_is_not_made_admin(db: TestDb) {
    // Someone registers the address the operator is about to configure.
    let app = TestApp::start(db).await;
    let registered = app
        .post_json(
            "/api/v1/register",
            &serde_json::json!({"email": "ops@example.com", "name": "Mallory", "password": "mallory's own password"}),
        )
        .await;
    assert_eq!(registered.status(), 201);
    let db = app.stop().await;

    let config = config(
        &db,
        &[
            ("SHOPMESH_USERS__BOOTSTRAP_ADMIN_EMAIL", "ops@example.com"),
            (
                "SHOPMESH_USERS__BOOTSTRAP_ADMIN_PASSWORD",
                "bootstrap secret 1",
            ),
        ],
    );
    let refused = shopmesh_users::Application::build(config).await;
    let error = format!("{:#}", refused.err().expect("the service refuses to start"));
    assert!(error.contains("is a customer's account"), "{error}");
    assert!(error.contains("admin create-admin"), "{error}");

    // The account is untouched: still a customer, with Mallory's password.
    let app = TestApp::start(db).await;
    let token = app.token("ops@example.com", "mallory's own password").await;
    assert_eq!(app.get("/api/v1/users", Some(&token)).await.status(), 403);
}

async fn readyz_reports_the_database(db: TestDb) {
    let app = TestApp::start(db).await;
    let ready = app.get("/readyz", None).await;
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.expect("json");
    assert_eq!(body["checks"]["database"], "ok");
}
