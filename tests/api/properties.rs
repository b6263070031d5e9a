//! Properties over generated input (proptest, a bounded number of cases):
//! normalization, fingerprints and validation, and decimals round-tripping
//! through both databases.

use order_service::{
    api::{GetOrderBy, ListQuery, page_token},
    domain::{AccountId, NewOrder, OrderFilter, OrderId, PositiveDecimal},
    proto::{CancelOrderRequest, GetOrderRequest, ListOrdersRequest, PlaceOrderRequest, get_order_request},
};
use proptest::{
    prelude::*,
    test_runner::{Config, TestCaseError, TestRunner},
};
use tonic::Status;

use crate::helpers::{Engine, engine_tests, limit_order, new_key, spawn_app};

const CASES: u32 = 512;

/// Decimal-looking text: digits, optionally a point and more digits, with
/// leading and trailing zeros, sometimes past the limits.
fn decimal_text() -> impl Strategy<Value = String> {
    ("0{0,3}[0-9]{1,22}", proptest::option::of("[0-9]{1,20}0{0,3}")).prop_map(|(int, frac)| match frac {
        Some(frac) => format!("{int}.{frac}"),
        None => int,
    })
}

/// The canonical form, worked out without `rust_decimal`: integer part
/// without leading zeros (at least "0"), fraction without trailing zeros,
/// no point when no fraction is left.
fn canonical(text: &str) -> String {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    let int = match int.trim_start_matches('0') {
        "" => "0",
        int => int,
    };
    match frac.trim_end_matches('0') {
        "" => int.to_owned(),
        frac => format!("{int}.{frac}"),
    }
}

/// Requests drawn from small sets of spellings, so that different requests
/// with equal normalized fields come up often.
fn similar_request() -> impl Strategy<Value = PlaceOrderRequest> {
    let decimal = || prop::sample::select(vec!["1", "1.0", "01", "2", "2.50", "2.5", "10", "1.00"]);
    (
        prop::sample::select(vec!["AAPL", "MSFT"]),
        1..=2i32,
        1..=2i32,
        decimal(),
        prop::option::of(decimal()),
        0..=3i32,
    )
        .prop_map(|(symbol, side, order_type, quantity, price, time_in_force)| PlaceOrderRequest {
            client_request_id: "0b6c6cf2-3a7e-4c1d-9e2f-6a1b2c3d4e5f".to_owned(),
            symbol: symbol.to_owned(),
            side,
            order_type,
            quantity: quantity.to_owned(),
            // A market order takes no price, a limit order needs one.
            limit_price: if order_type == 1 { price.unwrap_or("3").to_owned() } else { String::new() },
            time_in_force,
        })
}

/// Another spelling of the same value: a leading or trailing zero, or
/// `UNSPECIFIED` for GTC and back.
fn respell_decimal(text: &str) -> String {
    if text.contains('.') { format!("{text}0") } else { format!("0{text}") }
}

/// Two requests where each field of the second is the first's, the first's
/// in another spelling, or drawn on its own: equal, equivalent and different
/// payloads all come up often.
fn similar_pair() -> impl Strategy<Value = (PlaceOrderRequest, PlaceOrderRequest)> {
    (similar_request(), similar_request(), prop::array::uniform6(0..3u8)).prop_map(|(a, own, picks)| {
        let pick = |i: usize, same: String, respelled: String, own: String| match picks[i] {
            0 => same,
            1 => respelled,
            _ => own,
        };
        let tif_respelled = match a.time_in_force {
            0 => 1,
            1 => 0,
            other => other,
        };
        let b = PlaceOrderRequest {
            client_request_id: a.client_request_id.clone(),
            symbol: pick(0, a.symbol.clone(), a.symbol.clone(), own.symbol),
            side: if picks[1] == 2 { own.side } else { a.side },
            order_type: if picks[2] == 2 { own.order_type } else { a.order_type },
            quantity: pick(3, a.quantity.clone(), respell_decimal(&a.quantity), own.quantity),
            limit_price: match (a.limit_price.is_empty(), picks[4]) {
                (true, 2) | (false, 2) => own.limit_price,
                (true, _) => String::new(),
                (false, 1) => respell_decimal(&a.limit_price),
                (false, _) => a.limit_price.clone(),
            },
            time_in_force: match picks[5] {
                0 => a.time_in_force,
                1 => tif_respelled,
                _ => own.time_in_force,
            },
        };
        (a, b)
    })
}

/// Anything at all in every field.
fn arbitrary_request() -> impl Strategy<Value = PlaceOrderRequest> {
    (
        any::<String>(),
        any::<String>(),
        any::<i32>(),
        any::<i32>(),
        any::<String>(),
        any::<String>(),
        any::<i32>(),
    )
        .prop_map(
            |(client_request_id, symbol, side, order_type, quantity, limit_price, time_in_force)| {
                PlaceOrderRequest {
                    client_request_id,
                    symbol,
                    side,
                    order_type,
                    quantity,
                    limit_price,
                    time_in_force,
                }
            },
        )
}

/// Normalized fields, the ones the fingerprint covers.
fn normalized(order: &NewOrder) -> impl PartialEq + std::fmt::Debug {
    (
        order.symbol.as_str().to_owned(),
        order.side,
        order.order_type,
        order.quantity,
        order.limit_price,
        order.time_in_force,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    #[test]
    fn normalization_is_idempotent_and_keeps_the_value(text in decimal_text()) {
        if let Ok(decimal) = PositiveDecimal::parse(&text) {
            let once = decimal.to_string();
            prop_assert_eq!(&once, &canonical(&text), "the normalized form is the canonical spelling");
            let again = PositiveDecimal::parse(&once).expect("a normalized decimal parses");
            prop_assert_eq!(again.to_string(), once);
            prop_assert_eq!(again, decimal);
        }
    }

    #[test]
    fn fingerprints_are_equal_exactly_when_normalized_fields_are((a, b) in similar_pair()) {
        let a = NewOrder::try_from(a).expect("valid");
        // Mixing fields can pair a market order with a price: not a request.
        let Ok(b) = NewOrder::try_from(b) else { return Ok(()) };
        prop_assert_eq!(a.fingerprint() == b.fingerprint(), normalized(&a) == normalized(&b));
        prop_assert_eq!(a.fingerprint() == b.fingerprint(), a.mismatched_fields(&b.clone().into_order(
            AccountId::new("a"), OrderId::generate(), order_service::domain::Timestamp::from_micros(0),
        )).is_empty());
    }

    #[test]
    fn validation_never_panics_and_refusals_become_statuses(req in arbitrary_request()) {
        if let Err(error) = NewOrder::try_from(req) {
            let status = Status::from(error);
            prop_assert_eq!(status.code(), tonic::Code::InvalidArgument);
        }
    }

    #[test]
    fn the_other_requests_never_panic_either(
        text in any::<String>(),
        number in any::<i32>(),
        by_key in any::<bool>(),
    ) {
        let lookup = if by_key {
            get_order_request::Lookup::ClientRequestId(text.clone())
        } else {
            get_order_request::Lookup::OrderId(text.clone())
        };
        let _ = GetOrderBy::try_from(GetOrderRequest { lookup: Some(lookup) }).map_err(Status::from);
        let list = ListOrdersRequest {
            page_size: number,
            page_token: text.clone(),
            symbol: text.clone(),
            status: number,
        };
        let _ = ListQuery::try_from(list).map_err(Status::from);
        let _ = page_token::decode(&text, &AccountId::new("a"), &OrderFilter::default());
        let _ = OrderId::try_from(CancelOrderRequest { order_id: text }).map_err(Status::from);
    }
}

/// Valid decimals spread over the whole allowed range: up to 20 digits
/// before the point, 18 after, 28 significant.
fn valid_decimal_text() -> impl Strategy<Value = String> {
    (1..=20usize, 0..=18usize)
        .prop_filter("at most 28 significant digits", |(int, frac)| int + frac <= 28)
        .prop_flat_map(|(int, frac)| {
            let int = proptest::string::string_regex(&format!("[1-9][0-9]{{{}}}", int - 1)).unwrap();
            let frac = proptest::string::string_regex(&format!("[0-9]{{{frac}}}")).unwrap();
            (int, frac, any::<bool>())
        })
        .prop_map(|(int, frac, below_one)| match (below_one, frac.is_empty()) {
            (true, false) => format!("0.{frac}"),
            (_, true) => int,
            (false, false) => format!("{int}.{frac}"),
        })
        .prop_filter("positive", |text| PositiveDecimal::parse(text).is_ok())
}

async fn decimals_round_trip_through_the_database_unchanged(engine: Engine) {
    let app = spawn_app(engine).await;
    let handle = tokio::runtime::Handle::current();
    let mut runner = TestRunner::new(Config { cases: 64, failure_persistence: None, ..Config::default() });
    let outcome = tokio::task::block_in_place(|| {
        runner.run(&(valid_decimal_text(), valid_decimal_text()), |(quantity, price)| {
            let mut client = app.client.clone();
            let mut req = limit_order(&new_key());
            req.quantity = quantity.clone();
            req.limit_price = price.clone();
            let fail = |status: Status| TestCaseError::fail(format!("{status:?}"));
            let placed = handle.block_on(client.place_order(req)).map_err(fail)?.into_inner().order.unwrap();
            let lookup = get_order_request::Lookup::OrderId(placed.order_id);
            let stored =
                handle.block_on(client.get_order(GetOrderRequest { lookup: Some(lookup) })).map_err(fail)?;
            let stored = stored.into_inner();
            prop_assert_eq!(&stored.quantity, &canonical(&quantity));
            prop_assert_eq!(&stored.limit_price, &canonical(&price));
            prop_assert_eq!(stored.quantity, placed.quantity);
            prop_assert_eq!(stored.limit_price, placed.limit_price);
            Ok(())
        })
    });
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
}

engine_tests!(decimals_round_trip_through_the_database_unchanged);
