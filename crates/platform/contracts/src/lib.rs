//! Every event between shopmesh services, as types.
//!
//! Each event is one payload type implementing [`Contract`]: its type name (also the RabbitMQ
//! routing key), its schema version, the service that writes it and the services that read it.
//! Producers build events only from these types ([`Event::of`]); consumers read them only
//! through [`Envelope::decode`], which checks the type and version before any business code
//! runs and names the field when a payload does not match. So a renamed field is a compile
//! error on both sides, and an event of a version a consumer does not read is a failure with a
//! reason (retried, then a dead letter), never a zero.
//!
//! [`EVENTS`] lists them all with an example payload; tests check that every example decodes
//! and round-trips, that `docs/events.md` documents exactly these events with these examples,
//! and that [`TOPOLOGY`] (the queues each consuming service declares) binds every event to
//! exactly its consumers.

mod currency;

pub use currency::Currency;
use serde::{Deserialize, Serialize};
use shopmesh_events::rabbit::Topology;
pub use shopmesh_events::{Contract, DecodeError, Envelope, Event};
use uuid::Uuid;

/// `user.registered` v1: an account was created (customers registering, and admins made by
/// `shopmesh admin create-admin`), written with the account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRegistered {
    /// The account.
    pub user_id: Uuid,
    /// Its e-mail address.
    pub email: String,
    /// Its display name.
    pub name: String,
    /// `customer` or `admin`.
    pub role: String,
}

impl Contract for UserRegistered {
    const KIND: &'static str = "user.registered";
    const VERSION: u32 = 1;
    const PRODUCER: &'static str = "users";
    const CONSUMERS: &'static [&'static str] = &["notifications"];

    fn aggregate_id(&self) -> String {
        self.user_id.hyphenated().to_string()
    }
}

/// An order as it stands after a change: the payload of every `order.*` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderSnapshot {
    /// The order.
    pub order_id: Uuid,
    /// Its customer.
    pub user_id: Uuid,
    /// `awaiting_payment`, `paid`, `cancelled`, `expired`.
    pub status: String,
    /// In minor units (cents).
    pub total: i64,
    /// ISO 4217.
    pub currency: String,
    /// The card's last four digits, once paid.
    pub card_last4: Option<String>,
    /// What was bought.
    pub lines: Vec<OrderLine>,
}

/// A line of an [`OrderSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    /// The product.
    pub product_id: Uuid,
    /// Its SKU when ordered.
    pub sku: String,
    /// Its name when ordered.
    pub name: String,
    /// Its price when ordered, in minor units.
    pub unit_price: i64,
    /// How many.
    pub quantity: i64,
}

/// Which change an `order.*` event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderChange {
    /// `order.placed`: stock reserved; the order awaits payment.
    Placed,
    /// `order.paid`: captured and the stock committed.
    Paid,
    /// `order.cancelled`: cancelled by the customer (stock back, capture refunded).
    Cancelled,
    /// `order.expired`: not paid in time, or its hold ran out while paying.
    Expired,
}

macro_rules! order_event {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $change:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub OrderSnapshot);

        impl Contract for $name {
            const KIND: &'static str = $kind;
            const VERSION: u32 = 1;
            const PRODUCER: &'static str = "orders";
            const CONSUMERS: &'static [&'static str] = &["notifications"];

            fn aggregate_id(&self) -> String {
                self.0.order_id.hyphenated().to_string()
            }
        }
    };
}

order_event!(
    /// `order.placed` v1.
    OrderPlaced, "order.placed", Placed
);
order_event!(
    /// `order.paid` v1.
    OrderPaid, "order.paid", Paid
);
order_event!(
    /// `order.cancelled` v1.
    OrderCancelled, "order.cancelled", Cancelled
);
order_event!(
    /// `order.expired` v1.
    OrderExpired, "order.expired", Expired
);

impl OrderSnapshot {
    /// The event reporting `change`, with this snapshot.
    pub fn event(self, change: OrderChange) -> Result<Event, serde_json::Error> {
        match change {
            OrderChange::Placed => Event::of(&OrderPlaced(self)),
            OrderChange::Paid => Event::of(&OrderPaid(self)),
            OrderChange::Cancelled => Event::of(&OrderCancelled(self)),
            OrderChange::Expired => Event::of(&OrderExpired(self)),
        }
    }

    /// The change and snapshot of an `order.*` envelope (`Ok(None)` for any other type).
    pub fn decode(
        envelope: &Envelope,
    ) -> Result<Option<(OrderChange, OrderSnapshot)>, DecodeError> {
        Ok(match envelope.kind.as_str() {
            OrderPlaced::KIND => envelope
                .decode::<OrderPlaced>()?
                .map(|o| (OrderChange::Placed, o.0)),
            OrderPaid::KIND => envelope
                .decode::<OrderPaid>()?
                .map(|o| (OrderChange::Paid, o.0)),
            OrderCancelled::KIND => envelope
                .decode::<OrderCancelled>()?
                .map(|o| (OrderChange::Cancelled, o.0)),
            OrderExpired::KIND => envelope
                .decode::<OrderExpired>()?
                .map(|o| (OrderChange::Expired, o.0)),
            _ => None,
        })
    }
}

/// `payment.captured` v1: a card was charged for an order, written with the capture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentCaptured {
    /// The order paid for.
    pub order_id: Uuid,
    /// The payment.
    pub payment_id: Uuid,
    /// In minor units.
    pub amount: i64,
    /// ISO 4217.
    pub currency: String,
    /// The card's last four digits.
    pub card_last4: String,
}

impl Contract for PaymentCaptured {
    const KIND: &'static str = "payment.captured";
    const VERSION: u32 = 1;
    const PRODUCER: &'static str = "payments";
    const CONSUMERS: &'static [&'static str] = &[];

    fn aggregate_id(&self) -> String {
        self.order_id.hyphenated().to_string()
    }
}

/// `payment.refunded` v1: an order's capture was refunded, written with the refund.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRefunded {
    /// The order refunded.
    pub order_id: Uuid,
    /// In minor units.
    pub amount: i64,
    /// ISO 4217.
    pub currency: String,
}

impl Contract for PaymentRefunded {
    const KIND: &'static str = "payment.refunded";
    const VERSION: u32 = 1;
    const PRODUCER: &'static str = "payments";
    const CONSUMERS: &'static [&'static str] = &[];

    fn aggregate_id(&self) -> String {
        self.order_id.hyphenated().to_string()
    }
}

/// `stock.changed` v1: a product's levels after any change to its stock, written in the
/// change's transaction. Consumers keep the latest by position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockChanged {
    /// The product.
    pub product_id: Uuid,
    /// What can still be ordered: on hand minus reserved.
    pub available: i64,
    /// Held for unpaid orders.
    pub reserved: i64,
    /// In the warehouse, reserved included.
    pub on_hand: i64,
    /// Sold so far.
    pub sold: i64,
}

impl Contract for StockChanged {
    const KIND: &'static str = "stock.changed";
    const VERSION: u32 = 1;
    const PRODUCER: &'static str = "inventory";
    const CONSUMERS: &'static [&'static str] = &["catalog"];

    fn aggregate_id(&self) -> String {
        self.product_id.hyphenated().to_string()
    }
}

/// One event of [`EVENTS`].
#[derive(Debug, Clone, Copy)]
pub struct Descriptor {
    /// Its type.
    pub kind: &'static str,
    /// Its version.
    pub version: u32,
    /// Who writes it.
    pub producer: &'static str,
    /// Who reads it.
    pub consumers: &'static [&'static str],
    /// A payload, as documented.
    pub example: &'static str,
    /// Decodes `example` as the type and writes it back: equal JSON, or why not.
    pub round_trip: fn(&str) -> Result<(), String>,
}

impl Descriptor {
    const fn of<C: Contract>(example: &'static str) -> Self {
        Descriptor {
            kind: C::KIND,
            version: C::VERSION,
            producer: C::PRODUCER,
            consumers: C::CONSUMERS,
            example,
            round_trip: round_trip::<C>,
        }
    }
}

fn round_trip<C: Contract>(example: &str) -> Result<(), String> {
    let given: serde_json::Value = serde_json::from_str(example).map_err(|e| e.to_string())?;
    let typed: C = serde_json::from_value(given.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    if back == given {
        Ok(())
    } else {
        Err(format!("written back as {back}"))
    }
}

/// Every event of the shop.
pub const EVENTS: &[Descriptor] = &[
    Descriptor::of::<UserRegistered>(
        r#"{"user_id": "0194a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2b", "email": "cat@example.com", "name": "Cat", "role": "customer"}"#,
    ),
    Descriptor::of::<OrderPlaced>(ORDER_EXAMPLE),
    Descriptor::of::<OrderPaid>(ORDER_EXAMPLE),
    Descriptor::of::<OrderCancelled>(ORDER_EXAMPLE),
    Descriptor::of::<OrderExpired>(ORDER_EXAMPLE),
    Descriptor::of::<PaymentCaptured>(
        r#"{"order_id": "0194a1b2-c3d4-7e5f-8a6b-000000000001", "payment_id": "0194a1b2-c3d4-7e5f-8a6b-000000000002", "amount": 6980, "currency": "EUR", "card_last4": "4242"}"#,
    ),
    Descriptor::of::<PaymentRefunded>(
        r#"{"order_id": "0194a1b2-c3d4-7e5f-8a6b-000000000001", "amount": 6980, "currency": "EUR"}"#,
    ),
    Descriptor::of::<StockChanged>(
        r#"{"product_id": "0194a1b2-c3d4-7e5f-8a6b-000000000003", "available": 7, "reserved": 3, "on_hand": 10, "sold": 0}"#,
    ),
];

const ORDER_EXAMPLE: &str = r#"{"order_id": "0194a1b2-c3d4-7e5f-8a6b-000000000001", "user_id": "0194a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2b", "status": "paid", "total": 6980, "currency": "EUR", "card_last4": "4242", "lines": [{"product_id": "0194a1b2-c3d4-7e5f-8a6b-000000000003", "sku": "MUG-1", "name": "Mug", "unit_price": 3490, "quantity": 2}]}"#;

/// The RabbitMQ queues: each consuming service's queue, bound to exactly the events it reads
/// (a test derives it from [`EVENTS`]). Declared by the consumers and, before they publish, by
/// every producer (a topic exchange drops what no queue is bound to yet).
pub const TOPOLOGY: Topology = &[
    (
        "notifications",
        &[
            "user.registered",
            "order.placed",
            "order.paid",
            "order.cancelled",
            "order.expired",
        ],
    ),
    ("catalog", &["stock.changed"]),
];

/// The binding keys of `service`'s queue.
pub fn bindings(service: &str) -> Vec<&'static str> {
    TOPOLOGY
        .iter()
        .find(|(name, _)| *name == service)
        .map(|(_, keys)| keys.to_vec())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    #[test]
    fn every_example_decodes_and_round_trips() {
        for event in EVENTS {
            (event.round_trip)(event.example)
                .unwrap_or_else(|e| panic!("{} v{}: {e}", event.kind, event.version));
        }
    }

    #[test]
    fn the_topology_binds_every_event_to_exactly_its_consumers() {
        let mut wanted: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for event in EVENTS {
            for consumer in event.consumers {
                wanted.entry(consumer).or_default().insert(event.kind);
            }
        }
        let declared: BTreeMap<&str, BTreeSet<&str>> = TOPOLOGY
            .iter()
            .map(|(queue, keys)| (*queue, keys.iter().copied().collect()))
            .collect();
        assert_eq!(declared, wanted);
        assert_eq!(bindings("catalog"), vec!["stock.changed"]);
        assert!(bindings("cart").is_empty());
    }

    #[test]
    fn the_schema_document_describes_exactly_these_events_with_these_examples() {
        let doc = include_str!("../../../../docs/events.md");
        let mut documented = BTreeSet::new();
        for (i, _) in doc.match_indices("` v") {
            let kind = doc[..i].rsplit('`').next().unwrap_or_default();
            let version: String = doc[i + 3..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if kind.contains('.') && !kind.contains(' ') {
                documented.insert(format!("{kind} v{version}"));
            }
        }
        let typed: BTreeSet<String> = EVENTS
            .iter()
            .map(|e| format!("{} v{}", e.kind, e.version))
            .collect();
        assert_eq!(documented, typed, "docs/events.md and the contracts differ");
        for event in EVENTS {
            assert!(
                doc.contains(event.example),
                "docs/events.md lacks the example of {}: {}",
                event.kind,
                event.example
            );
        }
    }

    fn envelope(kind: &str, version: u32, payload: serde_json::Value) -> Envelope {
        Envelope {
            id: Uuid::now_v7(),
            position: 1,
            kind: kind.to_owned(),
            version,
            occurred_at: "2026-11-27T00:00:00Z".to_owned(),
            aggregate_id: "x".to_owned(),
            trace_id: None,
            payload,
        }
    }

    #[test]
    fn a_consumer_reads_its_type_and_version_and_names_what_is_wrong() {
        let example: serde_json::Value =
            serde_json::from_str(EVENTS[EVENTS.len() - 1].example).expect("json");
        let stock = envelope("stock.changed", 1, example.clone())
            .decode::<StockChanged>()
            .expect("decodes")
            .expect("is one");
        assert_eq!(stock.available, 7);
        // Another type: not for this decoder.
        assert!(
            envelope("order.paid", 1, example.clone())
                .decode::<StockChanged>()
                .expect("no error")
                .is_none()
        );
        // A version this consumer does not read: an error that says so, not a zero.
        let newer = envelope("stock.changed", 2, example.clone())
            .decode::<StockChanged>()
            .expect_err("v2");
        assert_eq!(
            newer.to_string(),
            "stock.changed v2 is not read here (this consumer reads v1)"
        );
        // A renamed field: named.
        let mut renamed = example;
        if let Some(map) = renamed.as_object_mut() {
            let v = map.remove("available").expect("field");
            map.insert("available_units".to_owned(), v);
        }
        let wrong = envelope("stock.changed", 1, renamed)
            .decode::<StockChanged>()
            .expect_err("renamed");
        assert!(
            wrong.to_string().contains("missing field `available`"),
            "{wrong}"
        );
    }

    #[test]
    fn an_order_event_carries_its_change_and_snapshot_both_ways() {
        let snapshot: OrderSnapshot = serde_json::from_str(ORDER_EXAMPLE).expect("example");
        for change in [
            OrderChange::Placed,
            OrderChange::Paid,
            OrderChange::Cancelled,
            OrderChange::Expired,
        ] {
            let event = snapshot.clone().event(change).expect("event");
            assert_eq!(
                event.aggregate_id,
                snapshot.order_id.hyphenated().to_string()
            );
            let back = envelope(event.kind, event.version, event.payload);
            assert_eq!(
                OrderSnapshot::decode(&back).expect("decodes"),
                Some((change, snapshot.clone()))
            );
        }
        let other = envelope("stock.changed", 1, serde_json::json!({}));
        assert_eq!(OrderSnapshot::decode(&other).expect("no error"), None);
    }
}
