//! Generated protobuf messages and client stubs of `orders.v1`. Nothing else
//! lives here.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// `orders.v1`: messages and `order_service_client`.
pub mod orders {
    pub mod v1 {
        tonic::include_proto!("orders.v1");
    }
}

pub use orders::v1::*;
