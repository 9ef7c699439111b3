//! `shopmesh verify`: reconciles the shop's books across services.
//!
//! It takes a snapshot over the services' internal gRPC surfaces (inventory's and orders'
//! `Audit`, payments' `GetPayment`) and checks, at a quiet moment:
//! 1. every product's stock balances: `added − removed = available + reserved + sold`, nothing
//!    negative;
//! 2. inventory agrees with orders: a product's `sold` is the units in paid orders, its
//!    `reserved` the units in unpaid ones;
//! 3. every paid order has one capture of exactly its total; a cancelled or expired order that
//!    was charged has been refunded; an unpaid order has no capture;
//! 4. no unpaid order and no stock hold outlives its expiry (beyond the workers' lag).
//!
//! The checks are a pure function of the snapshot ([`check`]), tested with crafted snapshots.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use shopmesh_config::{DataDir, Sources};
use shopmesh_proto::inventory::v1::AuditRequest as StockAudit;
use shopmesh_proto::inventory::v1::inventory_client::InventoryClient;
use shopmesh_proto::orders::v1::AuditRequest as OrdersAudit;
use shopmesh_proto::orders::v1::orders_client::OrdersClient;
use shopmesh_proto::payments::v1::GetPaymentRequest;
use shopmesh_proto::payments::v1::payments_client::PaymentsClient;

/// Checks that stock, orders and payments agree; exits non-zero naming what does not.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Data directory of a running `shopmesh up` (its up.json says where the services are)
    /// [default: ./data, or SHOPMESH_DATA_DIR].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The inventory's gRPC URL (instead of up.json).
    #[arg(long)]
    inventory_url: Option<String>,
    /// The orders service's gRPC URL (instead of up.json).
    #[arg(long)]
    orders_url: Option<String>,
    /// The payments service's gRPC URL (instead of up.json).
    #[arg(long)]
    payments_url: Option<String>,
    /// How late the expiry workers may be before an expired order or hold counts as a fault.
    #[arg(long, default_value_t = 10)]
    grace_secs: u64,
}

/// One product's stock, as inventory reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stock {
    /// Units that can be ordered.
    pub available: i64,
    /// Units held for unpaid orders.
    pub reserved: i64,
    /// Units sold.
    pub sold: i64,
    /// Units ever added.
    pub added: i64,
    /// Units ever removed.
    pub removed: i64,
}

/// One order, as orders reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// Its id.
    pub id: String,
    /// Its status.
    pub status: String,
    /// Its saga step in flight.
    pub step: String,
    /// Its total, minor units.
    pub total: i64,
    /// Its currency.
    pub currency: String,
    /// When an unpaid order expires, ms since the epoch.
    pub expires_at_ms: i64,
    /// `(product, units)`.
    pub lines: Vec<(String, i64)>,
}

/// One capture, as payments reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    /// Minor units.
    pub amount: i64,
    /// ISO 4217.
    pub currency: String,
    /// `captured` or `refunded`.
    pub status: String,
}

/// What the services said, at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Stock by product id.
    pub stock: BTreeMap<String, Stock>,
    /// Orders whose hold is past its expiry (and grace) but still held.
    pub overdue_holds: Vec<String>,
    /// Every placed order.
    pub orders: Vec<Order>,
    /// The capture of each order that has one.
    pub payments: HashMap<String, Payment>,
    /// Now, ms since the epoch.
    pub now_ms: i64,
}

/// Everything that does not add up, one sentence each.
pub fn check(s: &Snapshot, grace: Duration) -> Vec<String> {
    let mut findings = Vec::new();
    let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);

    for (product, level) in &s.stock {
        if level.added - level.removed != level.available + level.reserved + level.sold {
            findings.push(format!(
                "product {product}: added {} - removed {} != available {} + reserved {} + sold {}",
                level.added, level.removed, level.available, level.reserved, level.sold
            ));
        }
        if level.available < 0 || level.reserved < 0 || level.sold < 0 {
            findings.push(format!("product {product}: negative stock {level:?}"));
        }
    }

    let in_flight: Vec<&Order> = s.orders.iter().filter(|o| o.step != "idle").collect();
    for order in &in_flight {
        findings.push(format!(
            "order {}: step '{}' still in flight; the shop is not quiet (run verify again)",
            order.id, order.step
        ));
    }
    if in_flight.is_empty() {
        let mut sold: BTreeMap<&str, i64> = BTreeMap::new();
        let mut held: BTreeMap<&str, i64> = BTreeMap::new();
        for order in &s.orders {
            let bucket = match order.status.as_str() {
                "paid" => &mut sold,
                "awaiting_payment" | "pending" => &mut held,
                _ => continue,
            };
            for (product, units) in &order.lines {
                *bucket.entry(product).or_default() += units;
            }
        }
        let products: std::collections::BTreeSet<&str> = s
            .stock
            .keys()
            .map(String::as_str)
            .chain(sold.keys().copied())
            .chain(held.keys().copied())
            .collect();
        for product in products {
            let level = s.stock.get(product).cloned().unwrap_or_default();
            let ordered_sold = sold.get(product).copied().unwrap_or(0);
            let ordered_held = held.get(product).copied().unwrap_or(0);
            if level.sold != ordered_sold {
                findings.push(format!(
                    "product {product}: inventory sold {} but paid orders hold {ordered_sold}",
                    level.sold
                ));
            }
            if level.reserved != ordered_held {
                findings.push(format!(
                    "product {product}: inventory reserved {} but unpaid orders hold {ordered_held}",
                    level.reserved
                ));
            }
        }
    }

    for order in &s.orders {
        let payment = s.payments.get(&order.id);
        match (order.status.as_str(), payment) {
            ("paid", None) => findings.push(format!("order {}: paid but no capture", order.id)),
            ("paid", Some(p)) => {
                if p.amount != order.total || p.currency != order.currency {
                    findings.push(format!(
                        "order {}: total {} {} but captured {} {}",
                        order.id, order.total, order.currency, p.amount, p.currency
                    ));
                }
                if p.status != "captured" {
                    findings.push(format!(
                        "order {}: paid but its capture is {}",
                        order.id, p.status
                    ));
                }
            }
            ("cancelled" | "expired", Some(p)) if p.status != "refunded" => findings.push(format!(
                "order {}: {} but its capture of {} {} was not refunded",
                order.id, order.status, p.amount, p.currency
            )),
            ("awaiting_payment" | "pending", Some(p)) if order.step == "idle" => {
                findings.push(format!(
                    "order {}: {} yet {} {} was captured",
                    order.id, order.status, p.amount, p.currency
                ))
            }
            _ => {}
        }
        if order.status == "awaiting_payment" && order.expires_at_ms + grace_ms < s.now_ms {
            findings.push(format!(
                "order {}: unpaid past its expiry, not expired",
                order.id
            ));
        }
    }
    for hold in &s.overdue_holds {
        findings.push(format!("reservation of order {hold}: held past its expiry"));
    }
    findings
}

fn addresses(args: &VerifyArgs) -> anyhow::Result<(String, String, String)> {
    if let (Some(i), Some(o), Some(p)) = (&args.inventory_url, &args.orders_url, &args.payments_url)
    {
        return Ok((i.clone(), o.clone(), p.clone()));
    }
    let state = up_state(
        args.data_dir.as_ref(),
        "--inventory-url, --orders-url and --payments-url",
    )?;
    let addr = |service: &str| -> anyhow::Result<String> {
        state["processes"][service]["addr"]
            .as_str()
            .map(|a| format!("http://{a}"))
            .with_context(|| format!("up.json has no {service} process"))
    };
    Ok((
        args.inventory_url
            .clone()
            .map_or_else(|| addr("inventory"), Ok)?,
        args.orders_url.clone().map_or_else(|| addr("orders"), Ok)?,
        args.payments_url
            .clone()
            .map_or_else(|| addr("payments"), Ok)?,
    ))
}

/// The state file of the `shopmesh up` running on `data_dir` (default: ./data, or
/// SHOPMESH_DATA_DIR); `instead` names the options that make it unnecessary.
pub fn up_state(data_dir: Option<&PathBuf>, instead: &str) -> anyhow::Result<serde_json::Value> {
    let data_dir = match data_dir {
        Some(dir) => dir.clone(),
        None => {
            #[derive(serde::Deserialize, Default)]
            #[serde(default)]
            struct Dir {
                data_dir: DataDir,
            }
            let dir: Dir = Sources::from_process().load(Some("launcher"))?;
            dir.data_dir.0
        }
    };
    let path = data_dir.join("up.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {} (is `shopmesh up` running here?); or pass {instead}",
            path.display()
        )
    })?;
    serde_json::from_str(&text).context("up.json is malformed")
}

/// Largest audit answer read (a few million orders); paging the audits would lift the bound.
const AUDIT_MAX_BYTES: usize = 512 << 20;

async fn snapshot(args: &VerifyArgs) -> anyhow::Result<Snapshot> {
    let (inventory_url, orders_url, payments_url) = addresses(args)?;
    let deadline = Duration::from_secs(10);
    // Each audit answers with every row it checks in one message (~150 bytes an order): tonic's
    // default 4 MiB limit stopped `verify` after a 60 s benchmark's 30,000 purchases.
    let mut inventory =
        InventoryClient::new(shopmesh_runtime::grpc::channel(&inventory_url, deadline)?)
            .max_decoding_message_size(AUDIT_MAX_BYTES);
    let mut orders = OrdersClient::new(shopmesh_runtime::grpc::channel(&orders_url, deadline)?)
        .max_decoding_message_size(AUDIT_MAX_BYTES);
    let mut payments =
        PaymentsClient::new(shopmesh_runtime::grpc::channel(&payments_url, deadline)?)
            .max_decoding_message_size(AUDIT_MAX_BYTES);

    let stock_audit = inventory
        .audit(StockAudit {
            grace_seconds: i64::try_from(args.grace_secs).unwrap_or(i64::MAX),
        })
        .await
        .with_context(|| format!("inventory audit at {inventory_url}"))?
        .into_inner();
    let orders_audit = orders
        .audit(OrdersAudit {})
        .await
        .with_context(|| format!("orders audit at {orders_url}"))?
        .into_inner();
    let mut snapshot = Snapshot {
        stock: stock_audit
            .stock
            .into_iter()
            .map(|s| {
                (
                    s.product_id,
                    Stock {
                        available: s.available,
                        reserved: s.reserved,
                        sold: s.sold,
                        added: s.added,
                        removed: s.removed,
                    },
                )
            })
            .collect(),
        overdue_holds: stock_audit.overdue_holds,
        orders: orders_audit
            .orders
            .into_iter()
            .map(|o| Order {
                id: o.id,
                status: o.status,
                step: o.step,
                total: o.total,
                currency: o.currency,
                expires_at_ms: o.expires_at_ms,
                lines: o
                    .lines
                    .into_iter()
                    .map(|l| (l.product_id, l.quantity))
                    .collect(),
            })
            .collect(),
        payments: HashMap::new(),
        now_ms: i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or_default(),
        )
        .unwrap_or(i64::MAX),
    };
    for order in &snapshot.orders {
        match payments
            .get_payment(GetPaymentRequest {
                order_id: order.id.clone(),
            })
            .await
        {
            Ok(p) => {
                let p = p.into_inner();
                snapshot.payments.insert(
                    order.id.clone(),
                    Payment {
                        amount: p.amount,
                        currency: p.currency,
                        status: p.status,
                    },
                );
            }
            Err(status) if status.code() == tonic::Code::NotFound => {}
            Err(status) => {
                return Err(anyhow::anyhow!(
                    "payments at {payments_url}: {}",
                    status.message()
                ));
            }
        }
    }
    Ok(snapshot)
}

impl VerifyArgs {
    /// Checks the `shopmesh up` whose `up.json` is in `data_dir`, with the default grace.
    pub fn of_data_dir(data_dir: Option<PathBuf>) -> Self {
        VerifyArgs {
            data_dir,
            inventory_url: None,
            orders_url: None,
            payments_url: None,
            grace_secs: 10,
        }
    }
}

/// What does not balance (nothing when the books do).
pub async fn findings(args: &VerifyArgs) -> anyhow::Result<Vec<String>> {
    Ok(check(
        &snapshot(args).await?,
        Duration::from_secs(args.grace_secs),
    ))
}

/// Runs the checks and reports; an error (non-zero exit) when anything does not add up.
pub async fn run(args: VerifyArgs) -> anyhow::Result<()> {
    let snapshot = snapshot(&args).await?;
    let findings = check(&snapshot, Duration::from_secs(args.grace_secs));
    let paid = snapshot
        .orders
        .iter()
        .filter(|o| o.status == "paid")
        .count();
    println!(
        "verify: {} stocked products, {} orders ({} paid), {} captures",
        snapshot.stock.len(),
        snapshot.orders.len(),
        paid,
        snapshot.payments.len()
    );
    if findings.is_empty() {
        println!(
            "ok: every product's stock balances (added - removed = available + reserved + sold)"
        );
        println!("ok: sold and reserved units match paid and unpaid orders");
        println!(
            "ok: every paid order has one capture of its total; cancelled and expired ones are refunded"
        );
        println!("ok: no unpaid order or stock hold outlives its expiry");
        Ok(())
    } else {
        for finding in &findings {
            println!("FAIL: {finding}");
        }
        anyhow::bail!("{} finding(s): the books do not balance", findings.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(id: &str, status: &str, lines: &[(&str, i64)], total: i64) -> Order {
        Order {
            id: id.into(),
            status: status.into(),
            step: "idle".into(),
            total,
            currency: "EUR".into(),
            expires_at_ms: 2_000_000,
            lines: lines.iter().map(|(p, q)| ((*p).into(), *q)).collect(),
        }
    }

    fn captured(amount: i64, status: &str) -> Payment {
        Payment {
            amount,
            currency: "EUR".into(),
            status: status.into(),
        }
    }

    /// A balanced shop: 10 added, 3 sold (order A), 2 held (order B), order C cancelled after
    /// payment and refunded.
    fn balanced() -> Snapshot {
        Snapshot {
            stock: BTreeMap::from([(
                "p1".to_owned(),
                Stock {
                    available: 5,
                    reserved: 2,
                    sold: 3,
                    added: 10,
                    removed: 0,
                },
            )]),
            overdue_holds: vec![],
            orders: vec![
                order("A", "paid", &[("p1", 3)], 300),
                order("B", "awaiting_payment", &[("p1", 2)], 200),
                order("C", "cancelled", &[("p1", 1)], 100),
            ],
            payments: HashMap::from([
                ("A".to_owned(), captured(300, "captured")),
                ("C".to_owned(), captured(100, "refunded")),
            ]),
            now_ms: 1_000_000,
        }
    }

    #[test]
    fn a_balanced_shop_has_no_findings() {
        assert_eq!(
            check(&balanced(), Duration::from_secs(10)),
            Vec::<String>::new()
        );
    }

    #[test]
    fn stock_that_does_not_balance_is_named() {
        let mut s = balanced();
        if let Some(level) = s.stock.get_mut("p1") {
            level.available = 6;
        }
        let findings = check(&s, Duration::from_secs(10));
        assert!(
            findings
                .iter()
                .any(|f| f.contains("product p1") && f.contains("added 10")),
            "{findings:?}"
        );
    }

    #[test]
    fn sold_units_must_match_paid_orders() {
        let mut s = balanced();
        s.orders[0].lines[0].1 = 2;
        let findings = check(&s, Duration::from_secs(10));
        assert!(
            findings
                .iter()
                .any(|f| f.contains("sold 3 but paid orders hold 2")),
            "{findings:?}"
        );
    }

    #[test]
    fn a_paid_order_needs_one_capture_of_its_total() {
        let mut s = balanced();
        s.payments.insert("A".into(), captured(299, "captured"));
        assert!(
            check(&s, Duration::from_secs(10))
                .iter()
                .any(|f| f.contains("order A: total 300"))
        );
        s.payments.remove("A");
        assert!(
            check(&s, Duration::from_secs(10))
                .iter()
                .any(|f| f.contains("order A: paid but no capture"))
        );
    }

    #[test]
    fn a_cancelled_order_that_was_charged_must_be_refunded() {
        let mut s = balanced();
        s.payments.insert("C".into(), captured(100, "captured"));
        assert!(
            check(&s, Duration::from_secs(10))
                .iter()
                .any(|f| f.contains("order C: cancelled"))
        );
    }

    #[test]
    fn expired_but_unexpired_orders_and_overdue_holds_are_named() {
        let mut s = balanced();
        s.now_ms = 2_000_000 + 11_000;
        s.overdue_holds.push("B".into());
        let findings = check(&s, Duration::from_secs(10));
        assert!(
            findings
                .iter()
                .any(|f| f.contains("order B: unpaid past its expiry")),
            "{findings:?}"
        );
        assert!(
            findings
                .iter()
                .any(|f| f.contains("reservation of order B")),
            "{findings:?}"
        );
    }

    #[test]
    fn a_shop_with_steps_in_flight_is_not_quiet() {
        let mut s = balanced();
        s.orders[1].step = "charging".into();
        let findings = check(&s, Duration::from_secs(10));
        assert!(
            findings.iter().any(|f| f.contains("not quiet")),
            "{findings:?}"
        );
    }
}
