//! The broker goes away: the outbox absorbs what is committed meanwhile and the relay drains it
//! when the broker is back; a relay killed and restarted around a broker restart loses nothing.
//! Its own test binary: it stops and starts the machine's RabbitMQ (`rabbitmqctl stop_app` /
//! `start_app`), which no other test may see. Runs when `TEST_RABBITMQ_URL` is set (CI), since
//! it needs to control the broker; skipped with a notice otherwise.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shopmesh_events::consumer::Consumer;
use shopmesh_events::rabbit::{self, Topology};

const TEST_TOPOLOGY: Topology = &[("test", &["test.*"])];
use shopmesh_events::outbox;

mod common;
use common::{Recorder, append, clean_up, effects, producer_and_consumer, test_settings, wait_for};

/// Starts the broker's application again when dropped (also when the test fails).
struct BrokerBack;

impl Drop for BrokerBack {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").output();
        let _ = Command::new("rabbitmqctl")
            .args(["await_startup", "--timeout", "60"])
            .output();
    }
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_outbox_absorbs_a_broker_outage_and_a_killed_relay_loses_nothing() {
    let Ok(url) = std::env::var("TEST_RABBITMQ_URL") else {
        eprintln!("skipped: set TEST_RABBITMQ_URL to let this test stop and start the broker");
        return;
    };
    let settings = test_settings(&url);
    let ((_p, producer), (_c, db)) = producer_and_consumer().await;
    let positioner = outbox::spawn_positioner(producer.clone(), "test");
    let consumer = Arc::new(Consumer::new(
        db.clone(),
        Arc::new(Recorder),
        3,
        Duration::from_millis(50),
    ));
    let consuming = rabbit::spawn_consumer(consumer, settings.clone(), "test", vec!["test.*"]);
    let mut relay = rabbit::spawn_relay(producer.clone(), settings.clone(), "test", TEST_TOPOLOGY);
    for n in 0..20 {
        append(&producer, n).await;
    }
    wait_for(&db, 20, Duration::from_secs(20)).await;

    // The broker stops for 30 s; commits go on, into the outbox.
    let _back = BrokerBack;
    rabbitmqctl(&["stop_app"]);
    let down = Instant::now();
    let mut n = 20;
    while down.elapsed() < Duration::from_secs(30) {
        append(&producer, n).await;
        n += 1;
        if n == 60 {
            // The relay dies too (as under SIGKILL: no cleanup), and a new one starts.
            relay.abort();
            relay = rabbit::spawn_relay(producer.clone(), settings.clone(), "test", TEST_TOPOLOGY);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during = n - 20;
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup", "--timeout", "60"]);
    let back = Instant::now();
    wait_for(&db, i64::from(n), Duration::from_secs(60)).await;
    let drained = back.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "broker down 30 s: {during} events committed meanwhile; all {n} delivered once, the \
         backlog drained {drained:?} after the broker was back"
    );
    assert_eq!(effects(&db).await, i64::from(n), "lost or doubled");

    relay.abort();
    consuming.abort();
    positioner.abort();
    clean_up(&settings).await;
}
