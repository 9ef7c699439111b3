//! What the launcher's system tests share: a running `shopmesh up`, signals, logins.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_shopmesh");

/// A running `shopmesh up` in its own temp directory, stopped (SIGKILL) when dropped.
pub struct Shop {
    pub launcher: Child,
    pub gateway: String,
    pub dir: tempfile::TempDir,
    pub lines: mpsc::Receiver<String>,
}

/// A free port for a gateway, below the kernel's ephemeral range (so no outgoing connection
/// can take it before the launcher's child binds it) and apart from the launcher's own range.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    for attempt in 0..500u64 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(attempt);
        let port = 15_000 + (hasher.finish() % 5_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between 15000 and 20000")
}

impl Shop {
    pub fn start() -> Shop {
        Shop::start_with(&[])
    }

    pub fn start_with(env: &[(&str, &str)]) -> Shop {
        Shop::start_args(&[], env)
    }

    /// `shopmesh up` with these extra arguments (e.g. `--replicas inventory=3`).
    pub fn start_args(args: &[&str], env: &[(&str, &str)]) -> Shop {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut launcher = Command::new(BIN)
            .args(["up", "--port", &port.to_string()])
            .args(args)
            .current_dir(dir.path())
            .env("SHOPMESH_LOG__LEVEL", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn shopmesh up");
        // The launcher's stderr (restarts, start-up failures) goes through the test's output
        // capture, so a failing test shows it.
        let stderr = launcher.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[up!] {line}");
            }
        });
        let stdout = launcher.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("[up] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut shop = Shop {
            launcher,
            gateway: String::new(),
            dir,
            lines,
        };
        let ready = shop.wait_for_line("ready: ", Duration::from_secs(90));
        shop.gateway = ready.trim_start_matches("ready: ").to_owned();
        assert_eq!(shop.gateway, format!("http://127.0.0.1:{port}"));
        shop
    }

    pub fn wait_for_line(&self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(e) => panic!(
                    "no line starting with {prefix:?} ({e}); the launcher's own errors are above"
                ),
            }
        }
    }

    pub fn state(&self) -> Value {
        let text = std::fs::read_to_string(self.dir.path().join("data/up.json")).expect("up.json");
        serde_json::from_str(&text).expect("json")
    }

    pub fn pid_of(&self, service: &str) -> i32 {
        self.state()["processes"][service]["pid"]
            .as_i64()
            .expect("pid") as i32
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.gateway, path)
    }

    pub fn addr_of(&self, service: &str) -> String {
        self.state()["processes"][service]["addr"]
            .as_str()
            .expect("addr")
            .to_owned()
    }
}

impl Drop for Shop {
    fn drop(&mut self) {
        let _ = self.launcher.kill();
        let _ = self.launcher.wait();
    }
}

pub fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

pub fn signal(pid: i32, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

pub async fn login(
    client: &reqwest::Client,
    shop: &Shop,
    email: &str,
    password: &str,
) -> reqwest::Response {
    client
        .post(shop.url("/api/v1/login"))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .expect("login request")
}

pub async fn token(client: &reqwest::Client, shop: &Shop, email: &str, password: &str) -> String {
    let response = login(client, shop, email, password).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    body["access_token"].as_str().expect("token").to_owned()
}
