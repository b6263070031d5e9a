//! Arbitrary bytes decoded as a `PlaceOrderRequest` and pushed through
//! validation, normalization and fingerprinting, as the server does before
//! it touches the database. Nothing may panic; a refusal must become a
//! status; an accepted request's normalized form must validate to the same
//! order and fingerprint (normalization is a fixpoint).

#![no_main]

use libfuzzer_sys::fuzz_target;
use order_service::{domain::NewOrder, proto::PlaceOrderRequest};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = PlaceOrderRequest::decode(data) else {
        return;
    };
    match NewOrder::try_from(request.clone()) {
        Ok(order) => {
            let normalized = PlaceOrderRequest {
                client_request_id: order.client_request_id.to_string(),
                symbol: order.symbol.as_str().to_owned(),
                quantity: order.quantity.to_string(),
                limit_price: order.limit_price.map(|p| p.to_string()).unwrap_or_default(),
                ..request
            };
            let again = NewOrder::try_from(normalized).expect("a normalized request is valid");
            assert_eq!(again, order, "normalization is a fixpoint");
            assert_eq!(again.fingerprint(), order.fingerprint());
        }
        Err(error) => {
            let status = tonic::Status::from(error);
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
        }
    }
});
