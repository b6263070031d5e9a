//! Generated protobuf and gRPC code for `orders.v1`, plus the file descriptor set
//! that server reflection serves. Nothing else lives here.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// `orders.v1`: messages, `order_service_client` and `order_service_server`.
pub mod orders {
    pub mod v1 {
        tonic::include_proto!("orders.v1");
    }
}

pub use orders::v1::*;

/// Encoded `FileDescriptorSet` of `orders.v1` and its imports, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("orders_descriptor");
