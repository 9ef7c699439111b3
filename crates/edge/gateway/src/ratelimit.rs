//! Rate limits at the edge (GCRA, from `governor`).
//!
//! - every request, per client IP;
//! - routes that need a token, per user (the token's subject), once the token is verified;
//! - the login route, stricter: per client IP and per account (the e-mail in the body), so
//!   password guessing is slow from one address and against one account from many.
//!
//! A refused request is a 429 problem with `Retry-After`, and `RateLimit-Policy` / `RateLimit`
//! headers (IETF httpapi rate-limit headers) naming the policy that refused it. Limits of 0
//! are off. Keyed state is trimmed of idle keys periodically ([`RateLimits::sweep`]).

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use http::HeaderValue;
use serde::Deserialize;
use shopmesh_problem::{Kind, Problem};
use uuid::Uuid;

/// `[gateway.rate_limit]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSettings {
    /// Requests per second per client IP, on every route (0: off).
    pub per_ip_per_second: u32,
    /// Burst allowed above that rate.
    pub per_ip_burst: u32,
    /// Requests per second per user on routes that need a token (0: off).
    pub per_user_per_second: u32,
    /// Burst allowed above that rate.
    pub per_user_burst: u32,
    /// Login attempts per minute per client IP (0: off).
    pub login_per_minute_per_ip: u32,
    /// Login attempts per minute per account (0: off).
    pub login_per_minute_per_account: u32,
    /// The login route's path.
    pub login_path: String,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        RateLimitSettings {
            per_ip_per_second: 100,
            per_ip_burst: 200,
            per_user_per_second: 50,
            per_user_burst: 100,
            login_per_minute_per_ip: 10,
            login_per_minute_per_account: 5,
            login_path: "/api/v1/login".to_owned(),
        }
    }
}

/// A request a limit refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    policy: &'static str,
    quota: u32,
    window_secs: u64,
    retry_after: Duration,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        // Whole seconds, rounded up, at least one: a client retrying sooner is refused again.
        let secs = self.retry_after.as_secs() + u64::from(self.retry_after.subsec_nanos() > 0);
        let secs = secs.max(1);
        let mut response = Problem::new(Kind::RateLimited, "rate_limited", "Too many requests")
            .with_detail(format!(
                "Limit \"{}\": {} requests per {} s; retry in {secs} s.",
                self.policy, self.quota, self.window_secs
            ))
            .with_retry_after(secs)
            .into_response();
        let headers = response.headers_mut();
        if let Ok(policy) = HeaderValue::from_str(&format!(
            "\"{}\";q={};w={}",
            self.policy, self.quota, self.window_secs
        )) {
            headers.insert("ratelimit-policy", policy);
        }
        if let Ok(state) = HeaderValue::from_str(&format!("\"{}\";r=0;t={secs}", self.policy)) {
            headers.insert("ratelimit", state);
        }
        response
    }
}

struct Limiter<K: Hash + Eq + Clone> {
    policy: &'static str,
    quota: u32,
    window_secs: u64,
    inner: DefaultKeyedRateLimiter<K>,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    fn per_second(policy: &'static str, rate: u32, burst: u32) -> Option<Self> {
        let rate = NonZeroU32::new(rate)?;
        let burst = NonZeroU32::new(burst.max(rate.get())).unwrap_or(rate);
        Some(Limiter {
            policy,
            quota: rate.get(),
            window_secs: 1,
            inner: DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
        })
    }

    fn per_minute(policy: &'static str, count: u32) -> Option<Self> {
        let count = NonZeroU32::new(count)?;
        Some(Limiter {
            policy,
            quota: count.get(),
            window_secs: 60,
            inner: DefaultKeyedRateLimiter::keyed(Quota::per_minute(count)),
        })
    }

    fn check(&self, key: &K) -> Result<(), Refusal> {
        self.inner.check_key(key).map_err(|not_until| {
            metrics::counter!("gateway_rate_limited_total", "policy" => self.policy).increment(1);
            Refusal {
                policy: self.policy,
                quota: self.quota,
                window_secs: self.window_secs,
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            }
        })
    }

    fn sweep(&self) {
        self.inner.retain_recent();
        self.inner.shrink_to_fit();
    }
}

/// The longest e-mail address there is (RFC 5321: a path of 256 octets, less its brackets).
const MAX_EMAIL_BYTES: usize = 254;

/// The key a login counts under: the address as the users service compares it (trimmed,
/// lowercase), cut to the longest possible address, so a body of a megabyte is a key of 254
/// bytes (such an address can be no account: its attempts may share one bucket).
fn account_key(email: &str) -> String {
    let mut key = email.trim().to_lowercase();
    if key.len() > MAX_EMAIL_BYTES {
        let mut end = MAX_EMAIL_BYTES;
        while !key.is_char_boundary(end) {
            end -= 1;
        }
        key.truncate(end);
    }
    key
}

/// All the gateway's limits.
pub struct RateLimits {
    ip: Option<Limiter<IpAddr>>,
    user: Option<Limiter<Uuid>>,
    login_ip: Option<Limiter<IpAddr>>,
    login_account: Option<Limiter<String>>,
    login_path: String,
}

#[derive(Deserialize)]
struct LoginBody {
    email: Option<String>,
}

impl RateLimits {
    /// Limits as configured.
    pub fn new(settings: &RateLimitSettings) -> Self {
        RateLimits {
            ip: Limiter::per_second("ip", settings.per_ip_per_second, settings.per_ip_burst),
            user: Limiter::per_second(
                "user",
                settings.per_user_per_second,
                settings.per_user_burst,
            ),
            login_ip: Limiter::per_minute("login-ip", settings.login_per_minute_per_ip),
            login_account: Limiter::per_minute(
                "login-account",
                settings.login_per_minute_per_account,
            ),
            login_path: settings.login_path.clone(),
        }
    }

    /// Every request, by client address (an IPv6 client by its /64).
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Refusal> {
        self.ip
            .as_ref()
            .map_or(Ok(()), |l| l.check(&crate::client::limit_key(ip)))
    }

    /// A request with a verified token, by user.
    pub fn check_user(&self, user: Uuid) -> Result<(), Refusal> {
        self.user.as_ref().map_or(Ok(()), |l| l.check(&user))
    }

    /// A login attempt, by client address and by the account named in its body.
    pub fn check_login(&self, path: &str, ip: IpAddr, body: &[u8]) -> Result<(), Refusal> {
        if path != self.login_path {
            return Ok(());
        }
        if let Some(limiter) = &self.login_ip {
            limiter.check(&crate::client::limit_key(ip))?;
        }
        if let Some(limiter) = &self.login_account
            && let Ok(LoginBody { email: Some(email) }) = serde_json::from_slice(body)
        {
            limiter.check(&account_key(&email))?;
        }
        Ok(())
    }

    /// Forgets keys that have been idle long enough to be back at full allowance.
    pub fn sweep(&self) {
        if let Some(l) = &self.ip {
            l.sweep();
        }
        if let Some(l) = &self.user {
            l.sweep();
        }
        if let Some(l) = &self.login_ip {
            l.sweep();
        }
        if let Some(l) = &self.login_account {
            l.sweep();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> RateLimitSettings {
        RateLimitSettings {
            per_ip_per_second: 2,
            per_ip_burst: 2,
            per_user_per_second: 0,
            per_user_burst: 0,
            login_per_minute_per_ip: 3,
            login_per_minute_per_account: 2,
            login_path: "/api/v1/login".into(),
        }
    }

    #[test]
    fn a_client_over_its_rate_is_refused_and_told_when_to_retry() {
        let limits = RateLimits::new(&settings());
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        assert!(limits.check_ip(ip).is_ok());
        assert!(limits.check_ip(ip).is_ok());
        let refusal = limits.check_ip(ip).expect_err("third in the same instant");
        assert_eq!(refusal.policy, "ip");
        assert!(
            refusal.retry_after > Duration::ZERO && refusal.retry_after <= Duration::from_secs(1)
        );
        assert!(
            limits.check_ip("10.0.0.2".parse().expect("ip")).is_ok(),
            "others are unaffected"
        );
        assert!(
            limits.check_user(Uuid::now_v7()).is_ok(),
            "0 turns a limit off"
        );
    }

    #[test]
    fn login_is_limited_per_account_and_per_address() {
        let limits = RateLimits::new(&settings());
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        let ann = br#"{"email":"Ann@Example.com","password":"x"}"#;
        let bob = br#"{"email":"bob@example.com","password":"x"}"#;
        assert!(limits.check_login("/api/v1/login", ip, ann).is_ok());
        assert!(
            limits
                .check_login("/api/v1/login", ip, b"{\"email\":\"ann@example.com\"}")
                .is_ok()
        );
        let account = limits
            .check_login("/api/v1/login", ip, ann)
            .expect_err("ann again");
        assert_eq!(account.policy, "login-account");
        let address = limits
            .check_login("/api/v1/login", ip, bob)
            .expect_err("third from ip");
        assert_eq!(address.policy, "login-ip");
        assert!(
            limits.check_login("/api/v1/me", ip, bob).is_ok(),
            "only the login route"
        );
    }

    #[test]
    fn an_ipv6_client_is_limited_across_its_64() {
        let limits = RateLimits::new(&settings());
        assert!(
            limits
                .check_ip("2001:db8:1:2::1".parse().expect("ip"))
                .is_ok()
        );
        assert!(
            limits
                .check_ip("2001:db8:1:2::2".parse().expect("ip"))
                .is_ok()
        );
        let refusal = limits
            .check_ip("2001:db8:1:2:ffff::3".parse().expect("ip"))
            .expect_err("a third address of the same /64");
        assert_eq!(refusal.policy, "ip");
        assert!(
            limits
                .check_ip("2001:db8:1:3::1".parse().expect("ip"))
                .is_ok(),
            "the next /64 is another subscriber"
        );
    }

    #[test]
    fn a_login_key_is_at_most_an_address_long() {
        let huge = format!("{}@example.com", "Ä".repeat(500_000));
        let key = account_key(&huge);
        assert!(
            key.len() <= MAX_EMAIL_BYTES && key.len() >= MAX_EMAIL_BYTES - 1,
            "{}",
            key.len()
        );
        assert!(
            key.starts_with('ä'),
            "lowercased like the users service compares"
        );
        assert_eq!(account_key("  Ann@Example.com "), "ann@example.com");
        // Long addresses that differ only past the cap share a bucket: none of them exists.
        let limits = RateLimits::new(&settings());
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        let long = |tail: &str| format!(r#"{{"email":"{}{tail}"}}"#, "a".repeat(300)).into_bytes();
        assert!(limits.check_login("/api/v1/login", ip, &long("1")).is_ok());
        assert!(
            limits
                .check_login("/api/v1/login", "10.0.0.2".parse().expect("ip"), &long("2"))
                .is_ok()
        );
        let refused = limits
            .check_login("/api/v1/login", "10.0.0.3".parse().expect("ip"), &long("3"))
            .expect_err("the same capped key a third time");
        assert_eq!(refused.policy, "login-account");
    }

    #[test]
    fn a_refusal_is_a_429_problem_with_retry_after_and_ratelimit_headers() {
        let response = Refusal {
            policy: "login-account",
            quota: 5,
            window_secs: 60,
            retry_after: Duration::from_millis(11_200),
        }
        .into_response();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["retry-after"], "12");
        assert_eq!(
            response.headers()["ratelimit-policy"],
            "\"login-account\";q=5;w=60"
        );
        assert_eq!(
            response.headers()["ratelimit"],
            "\"login-account\";r=0;t=12"
        );
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }
}
