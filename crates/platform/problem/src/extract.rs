//! Extractors whose rejections are [`Problem`]s naming the field at fault.
//!
//! axum's own `Json` and `Path` reject with plain text; a client of a JSON API deserves a
//! machine-readable answer that says which field is wrong. Bodies are parsed through
//! `serde_path_to_error`, so a nested error says `items[2].quantity`, not just "invalid type".

use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, StatusCode, header};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Kind, Problem};

/// A JSON request body (`Content-Type: application/json`) or, as a response, a JSON body.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(Problem::new(
                Kind::UnsupportedMediaType,
                "unsupported_media_type",
                "Expected a JSON body",
            )
            .with_detail("Send the body with `Content-Type: application/json`."));
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(bytes_rejection)?;
        parse_json(&bytes).map(Json)
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

fn bytes_rejection(rejection: BytesRejection) -> Problem {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        Problem::new(
            Kind::PayloadTooLarge,
            "payload_too_large",
            "Request body too large",
        )
    } else {
        Problem::new(
            Kind::BadRequest,
            "unreadable_body",
            "Could not read the request body",
        )
    }
}

/// Parses a JSON document into `T`, turning every failure into a problem that names the field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(json_problem)?;
    de.end().map_err(|e| {
        Problem::new(Kind::BadRequest, "invalid_json", "Malformed JSON")
            .with_detail(format!("Trailing characters after the JSON value: {e}"))
    })?;
    Ok(value)
}

fn json_problem(error: serde_path_to_error::Error<serde_json::Error>) -> Problem {
    let path = error.path().to_string();
    let inner = error.inner();
    match inner.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            Problem::new(Kind::BadRequest, "invalid_json", "Malformed JSON")
                .with_detail(inner.to_string())
        }
        serde_json::error::Category::Io | serde_json::error::Category::Data => {
            // serde reports unknown and missing fields at the enclosing object, with the name in
            // the message; join them so `field` is the full path of the culprit.
            let message = strip_position(&inner.to_string());
            let named = backticked(&message);
            let (code, title, field) = if message.starts_with("unknown field") {
                ("unknown_field", "Unknown field", join(&path, named))
            } else if message.starts_with("missing field") {
                ("missing_field", "Missing field", join(&path, named))
            } else {
                ("invalid_field", "Invalid field", join(&path, None))
            };
            let mut problem = Problem::new(Kind::BadRequest, code, title).with_detail(message);
            if let Some(field) = field {
                problem = problem.with_field(field);
            }
            problem
        }
    }
}

fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

fn backticked(message: &str) -> Option<&str> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(&message[start..start + len])
}

fn join(path: &str, name: Option<&str>) -> Option<String> {
    let path = (path != ".").then_some(path);
    match (path, name) {
        // An unknown key is already the last segment of the path.
        (Some(p), Some(n)) if p == n || p.ends_with(&format!(".{n}")) => Some(p.to_owned()),
        (Some(p), Some(n)) => Some(format!("{p}.{n}")),
        (Some(p), None) => Some(p.to_owned()),
        (None, Some(n)) => Some(n.to_owned()),
        (None, None) => None,
    }
}

/// Path parameters; a parameter that does not parse (a malformed UUID) is a 400 naming it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(rejection) => Err(path_problem(rejection)),
        }
    }
}

fn path_problem(rejection: PathRejection) -> Problem {
    use axum::extract::path::ErrorKind;
    let PathRejection::FailedToDeserializePathParams(error) = &rejection else {
        return Problem::internal();
    };
    let problem = Problem::new(
        Kind::BadRequest,
        "invalid_path_parameter",
        "Invalid path parameter",
    );
    match error.kind() {
        ErrorKind::ParseErrorAtKey {
            key, expected_type, ..
        } => problem
            .with_detail(format!(
                "`{key}` must be a valid {}",
                friendly_type(expected_type)
            ))
            .with_field(key.clone()),
        ErrorKind::DeserializeError { key, message, .. } => {
            problem.with_detail(message.clone()).with_field(key.clone())
        }
        _ => problem.with_detail(rejection.body_text()),
    }
}

/// Query parameters; a malformed or unknown parameter is a 400 that says which.
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de)
            .map(Query)
            .map_err(|e| {
                let message = e.inner().to_string();
                let field = match (e.path().to_string(), backticked(&message)) {
                    (path, _) if path != "." => Some(path),
                    (_, Some(name)) => Some(name.to_owned()),
                    _ => None,
                };
                let problem =
                    Problem::new(Kind::BadRequest, "invalid_query", "Invalid query parameter")
                        .with_detail(message);
                match field {
                    Some(field) => problem.with_field(field),
                    None => problem,
                }
            })
    }
}

fn friendly_type(rust_type: &str) -> &str {
    if rust_type.ends_with("Uuid") {
        "UUID"
    } else {
        rust_type.rsplit("::").next().unwrap_or(rust_type)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Register {
        email: String,
        password: String,
        lines: Option<Vec<Line>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Line {
        quantity: u32,
    }

    fn err(body: &str) -> Problem {
        parse_json::<Register>(body.as_bytes()).expect_err("must fail")
    }

    #[test]
    fn an_unknown_field_is_rejected_and_named() {
        let p = err(r#"{"email":"a@b.co","password":"x","role":"admin"}"#);
        assert_eq!(p.code(), "unknown_field");
        assert_eq!(p.field(), Some("role"));
        assert_eq!(p.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn a_missing_field_is_named() {
        let p = err(r#"{"email":"a@b.co"}"#);
        assert_eq!(p.code(), "missing_field");
        assert_eq!(p.field(), Some("password"));
    }

    #[test]
    fn a_nested_wrong_type_names_the_full_path() {
        let p = err(r#"{"email":"a","password":"b","lines":[{"quantity":1},{"quantity":-3}]}"#);
        assert_eq!(p.code(), "invalid_field");
        assert_eq!(p.field(), Some("lines[1].quantity"));
    }

    #[test]
    fn malformed_json_is_invalid_json() {
        let p = err(r#"{"email": "#);
        assert_eq!(p.code(), "invalid_json");
        let p = err(r#"{"email":"a","password":"b"} trailing"#);
        assert_eq!(p.code(), "invalid_json");
    }

    #[test]
    fn json_content_types_are_recognised() {
        let mut headers = HeaderMap::new();
        assert!(!is_json(&headers));
        headers.insert(
            header::CONTENT_TYPE,
            "application/json; charset=utf-8".parse().expect("hv"),
        );
        assert!(is_json(&headers));
        headers.insert(
            header::CONTENT_TYPE,
            "application/merge-patch+json".parse().expect("hv"),
        );
        assert!(is_json(&headers));
        headers.insert(header::CONTENT_TYPE, "text/plain".parse().expect("hv"));
        assert!(!is_json(&headers));
    }
}
