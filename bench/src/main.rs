//! A closed-loop HTTP load generator for shopmesh benchmarks.
//!
//! Each of `--connections` tasks holds one keep-alive HTTP/1.1 connection and sends the same
//! request back to back; latencies go into an HDR histogram. With several `--target`s, the
//! targets take turns in short rounds (A, B, A, B, ...) so both see the same machine noise,
//! then one table compares them. Run by hand (see bench/README.md); never part of CI.

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http::{HeaderName, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Empty};
use tokio::net::TcpStream;

#[derive(Debug, Parser)]
#[command(about = "Closed-loop HTTP load generator; compares targets side by side")]
struct Args {
    /// `name=url` to load; repeat to compare (e.g. `direct=http://127.0.0.1:40001/api/v1/me`).
    #[arg(long = "target", required = true)]
    targets: Vec<String>,
    /// A header for every request, `name: value`; repeatable.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Concurrent keep-alive connections per target.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Measured seconds per target (split into rounds).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Rounds per target; the targets alternate between rounds.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Unmeasured seconds per target before the first round.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
}

struct Target {
    name: String,
    uri: Uri,
}

#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    elapsed: Duration,
    histogram: Option<Histogram<u64>>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let targets: Vec<Target> = args
        .targets
        .iter()
        .map(|t| {
            let (name, url) = t
                .split_once('=')
                .with_context(|| format!("--target {t:?}: expected name=url"))?;
            Ok(Target {
                name: name.to_owned(),
                uri: url
                    .parse()
                    .with_context(|| format!("--target {t:?}: bad url"))?,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let headers: Vec<(HeaderName, HeaderValue)> = args
        .headers
        .iter()
        .map(|h| {
            let (k, v) = h
                .split_once(':')
                .with_context(|| format!("--header {h:?}: expected `name: value`"))?;
            Ok((k.trim().parse()?, v.trim().parse()?))
        })
        .collect::<anyhow::Result<_>>()?;

    for target in &targets {
        load(
            target,
            &headers,
            args.connections,
            Duration::from_secs(args.warmup),
        )
        .await?;
    }
    let round = Duration::from_secs_f64(args.seconds as f64 / f64::from(args.rounds.max(1)));
    let mut tallies: Vec<Tally> = targets.iter().map(|_| Tally::default()).collect();
    for _ in 0..args.rounds.max(1) {
        for (target, tally) in targets.iter().zip(tallies.iter_mut()) {
            let result = load(target, &headers, args.connections, round).await?;
            tally.ok += result.ok;
            tally.failed += result.failed;
            tally.elapsed += result.elapsed;
            match (&mut tally.histogram, result.histogram) {
                (Some(h), Some(r)) => h.add(r)?,
                (slot @ None, r) => *slot = r,
                _ => {}
            }
        }
    }

    println!(
        "{:<10} {:>12} {:>10} {:>10} {:>10} {:>8}",
        "target", "requests/s", "p50 ms", "p99 ms", "max ms", "errors"
    );
    let mut first_rps = None;
    for (target, tally) in targets.iter().zip(&tallies) {
        let rps = tally.ok as f64 / tally.elapsed.as_secs_f64();
        let ms = |q: f64| {
            tally
                .histogram
                .as_ref()
                .map_or(0.0, |h| h.value_at_quantile(q) as f64 / 1000.0)
        };
        let max = tally
            .histogram
            .as_ref()
            .map_or(0.0, |h| h.max() as f64 / 1000.0);
        print!(
            "{:<10} {:>12.0} {:>10.2} {:>10.2} {:>10.2} {:>8}",
            target.name,
            rps,
            ms(0.5),
            ms(0.99),
            max,
            tally.failed
        );
        match first_rps {
            None => first_rps = Some(rps),
            Some(base) => print!("   ratio to {}: {:.2}", targets[0].name, rps / base),
        }
        println!();
    }
    Ok(())
}

/// Loads one target for `duration` with `connections` closed-loop clients.
async fn load(
    target: &Target,
    headers: &[(HeaderName, HeaderValue)],
    connections: usize,
    duration: Duration,
) -> anyhow::Result<Tally> {
    let started = Instant::now();
    let until = started + duration;
    let mut tasks = Vec::with_capacity(connections);
    for _ in 0..connections {
        let uri = target.uri.clone();
        let headers = headers.to_vec();
        tasks.push(tokio::spawn(
            async move { client(uri, headers, until).await },
        ));
    }
    let mut tally = Tally {
        histogram: Some(Histogram::new_with_bounds(1, 60_000_000, 3)?),
        ..Tally::default()
    };
    for task in tasks {
        let (ok, failed, histogram) = task.await??;
        tally.ok += ok;
        tally.failed += failed;
        if let Some(h) = tally.histogram.as_mut() {
            h.add(histogram)?;
        }
    }
    tally.elapsed = started.elapsed();
    Ok(tally)
}

async fn client(
    uri: Uri,
    headers: Vec<(HeaderName, HeaderValue)>,
    until: Instant,
) -> anyhow::Result<(u64, u64, Histogram<u64>)> {
    let authority = uri.authority().context("url needs host:port")?.clone();
    let mut histogram = Histogram::new_with_bounds(1, 60_000_000, 3)?;
    let (mut ok, mut failed) = (0u64, 0u64);
    'connect: while Instant::now() < until {
        let stream = TcpStream::connect(authority.as_str()).await?;
        stream.set_nodelay(true)?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        while Instant::now() < until {
            let mut request = Request::get(uri.clone())
                .header(http::header::HOST, authority.as_str())
                .body(Empty::<Bytes>::new())?;
            for (k, v) in &headers {
                request.headers_mut().insert(k.clone(), v.clone());
            }
            let sent = Instant::now();
            let response = match sender.send_request(request).await {
                Ok(response) => response,
                Err(_) => {
                    failed += 1;
                    continue 'connect;
                }
            };
            let success = response.status().is_success();
            let drained = response.into_body().collect().await.is_ok();
            histogram.saturating_record(sent.elapsed().as_micros() as u64);
            if success && drained {
                ok += 1;
            } else {
                failed += 1;
            }
        }
    }
    Ok((ok, failed, histogram))
}
