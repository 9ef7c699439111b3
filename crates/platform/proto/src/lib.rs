//! gRPC contracts between shopmesh services.
//!
//! The `.proto` files live in `proto/` at the repository root, one package per service and
//! version (`shopmesh.users.v1`). `build.rs` compiles them with protox, so no `protoc` is needed.
//! Services depend on this crate, never on each other's crates.

/// `shopmesh.cart.v1`: carts, as orders reads them.
pub mod cart {
    #[allow(clippy::all, missing_docs)]
    pub mod v1 {
        tonic::include_proto!("shopmesh.cart.v1");
    }
}

/// `shopmesh.catalog.v1`: products, as orders and cart price them.
pub mod catalog {
    #[allow(clippy::all, missing_docs)]
    pub mod v1 {
        tonic::include_proto!("shopmesh.catalog.v1");
    }
}

/// `shopmesh.inventory.v1`: stock levels and reservations.
pub mod inventory {
    #[allow(clippy::all, missing_docs)]
    pub mod v1 {
        tonic::include_proto!("shopmesh.inventory.v1");
    }
}

/// `shopmesh.orders.v1`: orders, for reconciliation.
pub mod orders {
    #[allow(clippy::all, missing_docs)]
    pub mod v1 {
        tonic::include_proto!("shopmesh.orders.v1");
    }
}

/// `shopmesh.payments.v1`: charges and refunds, idempotent by order id.
pub mod payments {
    #[allow(clippy::all, missing_docs)]
    pub mod v1 {
        tonic::include_proto!("shopmesh.payments.v1");
    }
}

/// `shopmesh.users.v1`: accounts, as other services see them.
pub mod users {
    #[allow(clippy::all, missing_docs)]
    pub mod v1 {
        tonic::include_proto!("shopmesh.users.v1");
    }
}
