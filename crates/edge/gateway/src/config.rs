//! The gateway's configuration: the common sections plus `[gateway]` (upstreams and routes).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use shopmesh_auth::AuthSettings;
use shopmesh_config::{ConfigError, DataDir, Sources};
use shopmesh_runtime::{LogSettings, ServerSettings};

pub use crate::ratelimit::RateLimitSettings;

/// Everything the gateway process reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Unused by the gateway today; accepted so one environment serves every process.
    pub data_dir: DataDir,
    /// `[server]`.
    pub server: ServerSettings,
    /// `[log]`.
    pub log: LogSettings,
    /// `[auth]`.
    pub auth: AuthSettings,
    /// `[gateway]`.
    pub gateway: GatewaySettings,
}

impl Config {
    /// Loads the gateway configuration from these sources and checks the route table.
    pub fn load(sources: &Sources) -> anyhow::Result<Self> {
        let config: Config = sources
            .load(Some("gateway"))
            .map_err(|e: ConfigError| anyhow::anyhow!(e))?;
        config.gateway.validate()?;
        Ok(config)
    }

    /// The JWKS URL: configured, or the users upstream's well-known path.
    pub fn jwks_url(&self) -> Option<String> {
        self.auth.jwks_url.clone().or_else(|| {
            self.gateway
                .upstreams
                .get("users")
                .map(|base| format!("{}/.well-known/jwks.json", base.trim_end_matches('/')))
        })
    }
}

/// `[gateway]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySettings {
    /// Largest request body accepted, in bytes (413 beyond).
    pub body_limit_bytes: usize,
    /// Deadline for an upstream to answer, in milliseconds (504 beyond).
    pub upstream_timeout_ms: u64,
    /// Deadline for connecting to an upstream, in milliseconds (503 beyond).
    pub connect_timeout_ms: u64,
    /// Base URL of each service, e.g. `users = "http://127.0.0.1:8081"`. Configured entries
    /// are merged over the defaults, so setting one service's URL keeps the others.
    #[serde(deserialize_with = "over_default_upstreams")]
    pub upstreams: BTreeMap<String, String>,
    /// The route table; the longest matching prefix wins.
    pub routes: Vec<RouteConfig>,
    /// `[gateway.rate_limit]`.
    pub rate_limit: RateLimitSettings,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        GatewaySettings {
            body_limit_bytes: 1024 * 1024,
            upstream_timeout_ms: 5_000,
            connect_timeout_ms: 1_000,
            upstreams: default_upstreams(),
            routes: default_routes(),
            rate_limit: RateLimitSettings::default(),
        }
    }
}

fn default_upstreams() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("users".to_owned(), "http://127.0.0.1:8081".to_owned()),
        ("catalog".to_owned(), "http://127.0.0.1:8082".to_owned()),
        ("inventory".to_owned(), "http://127.0.0.1:8083".to_owned()),
        ("orders".to_owned(), "http://127.0.0.1:8085".to_owned()),
        ("cart".to_owned(), "http://127.0.0.1:8086".to_owned()),
    ])
}

fn over_default_upstreams<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let configured = BTreeMap::<String, String>::deserialize(deserializer)?;
    let mut upstreams = default_upstreams();
    upstreams.extend(configured);
    Ok(upstreams)
}

/// The shop's routes. "public" routes may still have methods that need a token (creating a
/// product needs an admin): the service decides; "required" routes need a valid token for every
/// method and are refused at the edge without one.
fn default_routes() -> Vec<RouteConfig> {
    let route = |prefix: &str, service: &str, auth| RouteConfig {
        prefix: prefix.to_owned(),
        service: service.to_owned(),
        auth,
    };
    vec![
        route("/api/v1/register", "users", AuthPolicy::Public),
        route("/api/v1/login", "users", AuthPolicy::Public),
        route("/api/v1/me", "users", AuthPolicy::Required),
        route("/api/v1/users", "users", AuthPolicy::Required),
        route("/api/v1/products", "catalog", AuthPolicy::Public),
        route("/api/v1/inventory", "inventory", AuthPolicy::Public),
        route("/api/v1/orders", "orders", AuthPolicy::Required),
        route("/api/v1/cart", "cart", AuthPolicy::Required),
    ]
}

/// One entry of the route table.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Path prefix, matched on whole segments (`/api/v1/users` matches `/api/v1/users/7`, not
    /// `/api/v1/usersx`).
    pub prefix: String,
    /// The upstream service (a key of `upstreams`).
    pub service: String,
    /// Whether the gateway requires a valid token before forwarding.
    #[serde(default)]
    pub auth: AuthPolicy,
}

/// Who may pass a route.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthPolicy {
    /// Anyone.
    #[default]
    Public,
    /// Only callers with a valid access token.
    Required,
}

impl GatewaySettings {
    /// The upstream deadline.
    pub fn upstream_timeout(&self) -> Duration {
        Duration::from_millis(self.upstream_timeout_ms)
    }

    /// The connect deadline.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// Checks the table, naming the key at fault.
    pub fn validate(&self) -> anyhow::Result<()> {
        for (name, url) in &self.upstreams {
            let parsed: http::Uri = url.parse().map_err(|_| {
                anyhow::anyhow!(
                    "invalid configuration: gateway.upstreams.{name} \
                     (SHOPMESH_GATEWAY__UPSTREAMS__{}) = {url:?} is not a URL; expected \
                     http://host:port",
                    name.to_ascii_uppercase()
                )
            })?;
            if parsed.scheme_str() != Some("http") || parsed.authority().is_none() {
                anyhow::bail!(
                    "invalid configuration: gateway.upstreams.{name} = {url:?}: expected \
                     http://host:port"
                );
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, route) in self.routes.iter().enumerate() {
            let p = &route.prefix;
            let valid = p.starts_with('/')
                && (p == "/" || !p.ends_with('/'))
                && !p.contains(['{', '}', '*', '?', '#']);
            if !valid {
                anyhow::bail!(
                    "invalid configuration: gateway.routes[{i}].prefix = {p:?}: expected a path \
                     such as /api/v1/users (leading /, no trailing /, no wildcards)"
                );
            }
            if !seen.insert(p.as_str()) {
                anyhow::bail!(
                    "invalid configuration: gateway.routes[{i}].prefix {p:?} appears twice"
                );
            }
            if !self.upstreams.contains_key(&route.service) {
                anyhow::bail!(
                    "invalid configuration: gateway.routes[{i}].service = {:?} has no entry in \
                     gateway.upstreams",
                    route.service
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_table_is_valid_and_protects_me_and_users() {
        let config = Config::load(&Sources::empty()).expect("defaults");
        let me = config
            .gateway
            .routes
            .iter()
            .find(|r| r.prefix == "/api/v1/me")
            .expect("me");
        assert_eq!(me.auth, AuthPolicy::Required);
        assert_eq!(
            config.jwks_url().as_deref(),
            Some("http://127.0.0.1:8081/.well-known/jwks.json")
        );
    }

    #[test]
    fn an_upstream_comes_from_the_environment() {
        let config = Config::load(&Sources::empty().set(
            "SHOPMESH_GATEWAY__UPSTREAMS__USERS",
            "http://10.0.0.5:8080/",
        ))
        .expect("load");
        assert_eq!(config.gateway.upstreams["users"], "http://10.0.0.5:8080/");
        assert_eq!(
            config.gateway.upstreams["catalog"], "http://127.0.0.1:8082",
            "the other defaults stay"
        );
        assert_eq!(
            config.jwks_url().as_deref(),
            Some("http://10.0.0.5:8080/.well-known/jwks.json")
        );
    }

    #[test]
    fn a_bad_upstream_url_fails_naming_the_key() {
        let err =
            Config::load(&Sources::empty().set("SHOPMESH_GATEWAY__UPSTREAMS__USERS", "users"))
                .expect_err("invalid");
        assert!(err.to_string().contains("gateway.upstreams.users"), "{err}");
    }

    #[test]
    fn routes_to_unknown_services_or_odd_prefixes_are_refused() {
        let mut settings = GatewaySettings::default();
        settings.routes.push(RouteConfig {
            prefix: "/api/v1/reviews".into(),
            service: "reviews".into(),
            auth: AuthPolicy::Required,
        });
        assert!(settings.validate().is_err());
        let mut settings = GatewaySettings::default();
        settings.routes[0].prefix = "/api/v1/{x}".into();
        assert!(settings.validate().is_err());
        let mut settings = GatewaySettings::default();
        settings.routes[1].prefix = settings.routes[0].prefix.clone();
        assert!(settings.validate().is_err());
    }
}
