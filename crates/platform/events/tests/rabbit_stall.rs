//! The broker's connection goes silent (a half-open socket, a broker that accepts and never
//! answers): the relay gives it up after `broker_timeout_ms` and publishes again on a new one,
//! instead of waiting for publisher confirms that never come. Between the relay and the broker
//! sits a proxy of the test's own, which can stop forwarding the connections it holds while
//! keeping them open. Runs when `TEST_RABBITMQ_URL` is set (CI); skipped with a notice
//! otherwise.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use shopmesh_events::consumer::Consumer;
use shopmesh_events::rabbit::{self, EventsSettings, Topology};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

mod common;
use common::{Recorder, append, clean_up, effects, producer_and_consumer, test_settings, wait_for};

const TEST_TOPOLOGY: Topology = &[("test", &["test.*"])];

/// A TCP proxy to `upstream`. Connections accepted before the number sent on the returned
/// channel stop forwarding (both ways) but stay open; later ones are forwarded.
async fn proxy(upstream: SocketAddr) -> (SocketAddr, watch::Sender<u64>, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stall, stalled) = watch::channel(0u64);
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let id = counter.fetch_add(1, Ordering::SeqCst);
            let mut stalled = stalled.clone();
            tokio::spawn(async move {
                let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                    return;
                };
                let silent = tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => false,
                    _ = stalled.wait_for(|before| id < *before) => true,
                };
                if silent {
                    // Nothing more either way; both sockets stay open.
                    std::future::pending::<()>().await;
                }
            });
        }
    });
    (addr, stall, accepted)
}

/// `amqp://user:pass@host:port/vhost` → (`host:port`, the URL with `to` in its place).
fn through(url: &str, to: SocketAddr) -> (SocketAddr, String) {
    let start = url
        .find('@')
        .map_or_else(|| url.find("//").expect("//") + 2, |at| at + 1);
    let end = url[start..].find('/').map_or(url.len(), |i| start + i);
    let broker: SocketAddr = url[start..end]
        .replace("localhost", "127.0.0.1")
        .parse()
        .expect("the broker's address as ip:port");
    (broker, format!("{}{to}{}", &url[..start], &url[end..]))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_broker_connection_is_given_up_and_nothing_is_lost() {
    let Ok(url) = std::env::var("TEST_RABBITMQ_URL") else {
        eprintln!("skipped: set TEST_RABBITMQ_URL to run the RabbitMQ tests");
        return;
    };
    let (broker, _) = through(&url, "127.0.0.1:1".parse().expect("addr"));
    let (proxy_addr, stall, accepted) = proxy(broker).await;
    let (_, proxied) = through(&url, proxy_addr);
    let settings = EventsSettings {
        broker_timeout_ms: 1_000,
        ..test_settings(&url)
    };
    let ((_p, producer), (_c, db)) = producer_and_consumer().await;
    let consumer = Arc::new(Consumer::new(
        db.clone(),
        Arc::new(Recorder),
        3,
        Duration::from_millis(50),
    ));
    // The consumer straight to the broker, the relay through the proxy.
    let consuming = rabbit::spawn_consumer(consumer, settings.clone(), "test", vec!["test.*"]);
    let relay_settings = EventsSettings {
        rabbitmq_url: Some(proxied),
        ..settings.clone()
    };
    let relay = rabbit::spawn_relay(producer.clone(), relay_settings, "test", TEST_TOPOLOGY);
    for n in 0..10 {
        append(&producer, n).await;
    }
    wait_for(&db, 10, Duration::from_secs(20)).await;

    // The relay's connection goes silent; ten more events are committed.
    stall.send_replace(accepted.load(Ordering::SeqCst));
    let silent = Instant::now();
    for n in 10..20 {
        append(&producer, n).await;
    }
    // Without a deadline the relay waits for their confirms until the heartbeat gives the
    // connection up (about 20 s); with one it reconnects after a second.
    wait_for(&db, 20, Duration::from_secs(15)).await;
    let recovered = silent.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(effects(&db).await, 20, "lost or doubled");
    assert!(
        accepted.load(Ordering::SeqCst) >= 2,
        "the relay made a new connection"
    );
    println!(
        "a silent connection: all 20 events delivered once, {recovered:?} after it went silent"
    );

    relay.abort();
    consuming.abort();
    clean_up(&settings).await;
}
