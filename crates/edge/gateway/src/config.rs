//! The gateway's configuration: the common sections it uses plus `[gateway]` (upstreams and
//! routes). The common sections it does not use (`database`, `events`, `data_dir`) are set
//! aside by the loader, so one environment serves every process.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use shopmesh_auth::AuthSettings;
use shopmesh_config::{ConfigError, Sources};
use shopmesh_mesh::{MeshSettings, Source};
use shopmesh_runtime::{LogSettings, ServerSettings};

pub use crate::ratelimit::RateLimitSettings;

/// Everything the gateway process reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[server]`.
    pub server: ServerSettings,
    /// `[log]`.
    pub log: LogSettings,
    /// `[auth]`.
    pub auth: AuthSettings,
    /// `[gateway]`.
    pub gateway: GatewaySettings,
    /// `[mesh]`: discovery, balancing, health, breakers, retries for every upstream.
    pub mesh: MeshSettings,
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

    /// The JWKS URL: configured, or the well-known path of the users upstream when that is
    /// one fixed URL.
    pub fn jwks_url(&self) -> Option<String> {
        self.auth.jwks_url.clone().or_else(|| {
            let spec = self.gateway.upstreams.get("users")?;
            match Source::parse(spec).ok()? {
                Source::Static(endpoints) if endpoints.len() == 1 => Some(format!(
                    "{}/.well-known/jwks.json",
                    spec.trim().trim_end_matches('/')
                )),
                _ => None,
            }
        })
    }
}

impl shopmesh_service::Configuration for Config {
    fn load(sources: &Sources) -> anyhow::Result<Self> {
        Config::load(sources)
    }

    fn log(&self) -> &LogSettings {
        &self.log
    }
}

/// `[gateway]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySettings {
    /// Largest request body accepted, in bytes (413 beyond).
    pub body_limit_bytes: usize,
    /// Deadline of a request at the gateway, in milliseconds, for routes that set none (504
    /// beyond); propagated to the service.
    pub upstream_timeout_ms: u64,
    /// Where each service's endpoints are found: a URL or a list of them
    /// (`http://10.0.0.5:8080,http://10.0.0.6:8080`), `registry:<service>` (the launcher's),
    /// `dns:<name>:<port>` or `etcd:<service>`. Configured entries are merged over the
    /// defaults, so setting one service's keeps the others.
    #[serde(deserialize_with = "over_default_upstreams")]
    pub upstreams: BTreeMap<String, String>,
    /// The route table; the longest matching prefix wins.
    pub routes: Vec<RouteConfig>,
    /// `[gateway.rate_limit]`.
    pub rate_limit: RateLimitSettings,
    /// How long a kept answer may be served stale on `stale_fallback` routes, in seconds.
    pub stale_max_age_secs: u64,
    /// Bytes (keys and bodies) the answers kept for each service's `stale_fallback` routes
    /// may take; the oldest go first beyond it (as beyond 1,000 answers).
    pub cache_max_bytes: usize,
    /// Proxies in front of the gateway whose `X-Forwarded-For` is believed: a comma-separated
    /// list of addresses and networks (`10.0.0.0/8,fd00::/8`). Behind an ingress, the client
    /// is the first untrusted address from the right of that header, and rate limits count
    /// per client instead of all clients sharing the ingress's bucket. Empty (the default):
    /// the socket's peer is the client and the header is ignored.
    pub trusted_proxies: String,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        GatewaySettings {
            body_limit_bytes: 1024 * 1024,
            upstream_timeout_ms: 5_000,
            upstreams: default_upstreams(),
            routes: default_routes(),
            rate_limit: RateLimitSettings::default(),
            stale_max_age_secs: 300,
            cache_max_bytes: 16 * 1024 * 1024,
            trusted_proxies: String::new(),
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
        (
            "notifications".to_owned(),
            "http://127.0.0.1:8087".to_owned(),
        ),
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
        timeout_ms: None,
        stale_fallback: service == "catalog",
        retry_safe_posts: Vec::new(),
    };
    vec![
        // Public keys, so that services (and anyone) can check tokens through the one door.
        route("/.well-known/jwks.json", "users", AuthPolicy::Public),
        route("/api/v1/register", "users", AuthPolicy::Public),
        route("/api/v1/login", "users", AuthPolicy::Public),
        route("/api/v1/me", "users", AuthPolicy::Required),
        route("/api/v1/users", "users", AuthPolicy::Required),
        route("/api/v1/products", "catalog", AuthPolicy::Public),
        route("/api/v1/inventory", "inventory", AuthPolicy::Public),
        RouteConfig {
            // Paying is idempotent per order (one capture, whoever asks again), so a payment
            // whose orders instance died mid-request is retried on another.
            retry_safe_posts: vec!["/api/v1/orders/*/pay".to_owned()],
            // Long enough for a retry on another instance to wait out a dead instance's lease
            // (5 s) and the takeover of its key or payment step, instead of failing.
            timeout_ms: Some(10_000),
            ..route("/api/v1/orders", "orders", AuthPolicy::Required)
        },
        route("/api/v1/cart", "cart", AuthPolicy::Required),
        route(
            "/api/v1/admin/notifications",
            "notifications",
            AuthPolicy::Required,
        ),
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
    /// This route's deadline, in milliseconds [default: `gateway.upstream_timeout_ms`].
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Anonymous GETs are answered from a short-lived cache, marked stale, when the service
    /// cannot answer (every endpoint down or failing).
    #[serde(default)]
    pub stale_fallback: bool,
    /// Paths under this route where a POST is safe to repeat without an `Idempotency-Key`,
    /// because the service makes it idempotent by itself (paying an order: one capture per
    /// order); the gateway retries them as it retries keyed POSTs. `*` stands for one segment:
    /// `/api/v1/orders/*/pay`.
    #[serde(default)]
    pub retry_safe_posts: Vec<String>,
}

impl RouteConfig {
    /// Whether `path` is one of [`RouteConfig::retry_safe_posts`].
    pub fn retry_safe_post(&self, path: &str) -> bool {
        self.retry_safe_posts.iter().any(|pattern| {
            let mut given = path.trim_end_matches('/').split('/');
            let mut wanted = pattern.trim_end_matches('/').split('/');
            loop {
                match (wanted.next(), given.next()) {
                    (None, None) => return true,
                    (Some("*"), Some(segment)) if !segment.is_empty() => {}
                    (Some(w), Some(g)) if w == g => {}
                    _ => return false,
                }
            }
        })
    }

    /// The deadline of a request on this route.
    pub fn timeout(&self, default: Duration) -> Duration {
        self.timeout_ms.map_or(default, Duration::from_millis)
    }
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

    /// Checks the table, naming the key at fault.
    pub fn validate(&self) -> anyhow::Result<()> {
        crate::client::TrustedProxies::parse(&self.trusted_proxies).map_err(|e| {
            anyhow::anyhow!(
                "invalid configuration: gateway.trusted_proxies \
                 (SHOPMESH_GATEWAY__TRUSTED_PROXIES): {e}; expected a comma-separated list of \
                 addresses and networks"
            )
        })?;
        for (name, spec) in &self.upstreams {
            Source::parse(spec).map_err(|e| {
                anyhow::anyhow!(
                    "invalid configuration: gateway.upstreams.{name} \
                     (SHOPMESH_GATEWAY__UPSTREAMS__{}): {e}; expected http://host:port, a \
                     comma-separated list of them, registry:<service>, dns:<name>:<port> or \
                     etcd:<service>",
                    name.to_ascii_uppercase()
                )
            })?;
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
    fn paying_an_order_is_the_one_unkeyed_post_the_gateway_may_repeat() {
        let config = Config::load(&Sources::empty()).expect("defaults");
        let orders = config
            .gateway
            .routes
            .iter()
            .find(|r| r.prefix == "/api/v1/orders")
            .expect("orders");
        let order = "/api/v1/orders/0194a1b2-c3d4-7e5f-8a6b-000000000001";
        assert!(orders.retry_safe_post(&format!("{order}/pay")));
        assert!(orders.retry_safe_post(&format!("{order}/pay/")));
        for unsafe_path in [
            format!("{order}/cancel"),
            format!("{order}/pay/more"),
            "/api/v1/orders//pay".to_owned(),
            "/api/v1/orders".to_owned(),
            "/api/v1/orders/pay".to_owned(),
        ] {
            assert!(!orders.retry_safe_post(&unsafe_path), "{unsafe_path}");
        }
        assert!(
            config
                .gateway
                .routes
                .iter()
                .filter(|r| r.prefix != "/api/v1/orders")
                .all(|r| r.retry_safe_posts.is_empty())
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
            timeout_ms: None,
            stale_fallback: false,
            retry_safe_posts: Vec::new(),
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
