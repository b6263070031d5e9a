//! Protobuf to domain and back: validation of every request field, with all
//! violations gathered at once, and the response shape of an [`Order`].

use prost_types::Timestamp as ProtoTimestamp;

use crate::{
    domain::{
        ClientRequestId, NewOrder, Order, OrderFilter, OrderId, OrderStatus, OrderType, PositiveDecimal,
        Side, Symbol, TimeInForce, Timestamp,
    },
    error::{Error, FieldViolation},
    proto,
};

/// Collects the violations of one request.
#[derive(Default)]
struct Violations(Vec<FieldViolation>);

impl Violations {
    /// Keeps the value, or records why `field` was refused.
    fn check<T>(&mut self, field: &str, parsed: Result<T, String>) -> Option<T> {
        parsed.map_err(|why| self.0.push(FieldViolation::new(field, why))).ok()
    }

    fn into_result<T>(self, value: Option<T>) -> Result<T, Error> {
        match value {
            Some(value) if self.0.is_empty() => Ok(value),
            _ => Err(Error::InvalidArgument(self.0)),
        }
    }
}

fn side(n: i32) -> Result<Side, String> {
    match proto::Side::try_from(n) {
        Ok(proto::Side::Buy) => Ok(Side::Buy),
        Ok(proto::Side::Sell) => Ok(Side::Sell),
        Ok(proto::Side::Unspecified) => Err("is required: SIDE_BUY or SIDE_SELL".to_owned()),
        Err(_) => Err(format!("unknown value {n}: expected SIDE_BUY or SIDE_SELL")),
    }
}

fn order_type(n: i32) -> Result<OrderType, String> {
    match proto::OrderType::try_from(n) {
        Ok(proto::OrderType::Limit) => Ok(OrderType::Limit),
        Ok(proto::OrderType::Market) => Ok(OrderType::Market),
        Ok(proto::OrderType::Unspecified) => {
            Err("is required: ORDER_TYPE_LIMIT or ORDER_TYPE_MARKET".to_owned())
        }
        Err(_) => Err(format!("unknown value {n}: expected ORDER_TYPE_LIMIT or ORDER_TYPE_MARKET")),
    }
}

fn time_in_force(n: i32) -> Result<TimeInForce, String> {
    match proto::TimeInForce::try_from(n) {
        Ok(proto::TimeInForce::Unspecified | proto::TimeInForce::Gtc) => Ok(TimeInForce::Gtc),
        Ok(proto::TimeInForce::Ioc) => Ok(TimeInForce::Ioc),
        Ok(proto::TimeInForce::Fok) => Ok(TimeInForce::Fok),
        Err(_) => Err(format!(
            "unknown value {n}: expected TIME_IN_FORCE_GTC, TIME_IN_FORCE_IOC or TIME_IN_FORCE_FOK"
        )),
    }
}

/// `limit_price` is required for LIMIT orders and must be empty for MARKET.
fn limit_price(order_type: Option<OrderType>, price: &str) -> Result<Option<PositiveDecimal>, String> {
    match (order_type, price.is_empty()) {
        (Some(OrderType::Market), false) => Err("must be empty for ORDER_TYPE_MARKET".to_owned()),
        (Some(OrderType::Market), true) => Ok(None),
        (Some(OrderType::Limit), true) => Err("is required for ORDER_TYPE_LIMIT".to_owned()),
        // With an invalid order type, still say what is wrong with the price.
        (_, true) => Ok(None),
        (_, false) => PositiveDecimal::parse(price).map(Some),
    }
}

impl TryFrom<proto::PlaceOrderRequest> for NewOrder {
    type Error = Error;

    /// Validates every field, reporting all violations at once.
    fn try_from(req: proto::PlaceOrderRequest) -> Result<Self, Error> {
        let mut v = Violations::default();
        let client_request_id = v.check("client_request_id", ClientRequestId::parse(&req.client_request_id));
        let symbol = v.check("symbol", Symbol::parse(&req.symbol));
        let side = v.check("side", side(req.side));
        let order_type = v.check("order_type", order_type(req.order_type));
        let quantity = v.check(
            "quantity",
            if req.quantity.is_empty() {
                Err("is required".to_owned())
            } else {
                PositiveDecimal::parse(&req.quantity)
            },
        );
        let limit_price = v.check("limit_price", limit_price(order_type, &req.limit_price));
        let time_in_force = v.check("time_in_force", time_in_force(req.time_in_force));
        let order = (|| {
            Some(NewOrder {
                client_request_id: client_request_id?,
                symbol: symbol?,
                side: side?,
                order_type: order_type?,
                quantity: quantity?,
                limit_price: limit_price?,
                time_in_force: time_in_force?,
            })
        })();
        v.into_result(order)
    }
}

/// A validated `GetOrder` lookup.
#[derive(Debug, Clone, Copy)]
pub enum GetOrderBy {
    /// By the order's id.
    OrderId(OrderId),
    /// By the key that placed it.
    ClientRequestId(ClientRequestId),
}

impl TryFrom<proto::GetOrderRequest> for GetOrderBy {
    type Error = Error;

    fn try_from(req: proto::GetOrderRequest) -> Result<Self, Error> {
        use proto::get_order_request::Lookup as L;
        let mut v = Violations::default();
        let lookup = match req.lookup {
            Some(L::OrderId(id)) => v.check("order_id", OrderId::parse(&id)).map(GetOrderBy::OrderId),
            Some(L::ClientRequestId(key)) => {
                v.check("client_request_id", ClientRequestId::parse(&key)).map(GetOrderBy::ClientRequestId)
            }
            None => v.check("lookup", Err("set one of order_id or client_request_id".to_owned())),
        };
        v.into_result(lookup)
    }
}

/// A validated `ListOrders` request; the page token is checked later, against
/// the caller's account.
#[derive(Debug, Clone)]
pub struct ListQuery {
    /// The filters.
    pub filter: OrderFilter,
    /// Most orders in the page.
    pub page_size: u32,
    /// The raw page token; empty for the first page.
    pub page_token: String,
}

/// `page_size` when the caller gives none.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// The largest page; larger requests are clamped to it.
pub const MAX_PAGE_SIZE: u32 = 1000;

fn status_filter(n: i32) -> Result<Option<OrderStatus>, String> {
    match proto::OrderStatus::try_from(n) {
        Ok(proto::OrderStatus::Unspecified) => Ok(None),
        Ok(proto::OrderStatus::New) => Ok(Some(OrderStatus::New)),
        Ok(proto::OrderStatus::Canceled) => Ok(Some(OrderStatus::Canceled)),
        Err(_) => Err(format!("unknown value {n}: expected ORDER_STATUS_NEW or ORDER_STATUS_CANCELED")),
    }
}

impl TryFrom<proto::ListOrdersRequest> for ListQuery {
    type Error = Error;

    fn try_from(req: proto::ListOrdersRequest) -> Result<Self, Error> {
        let mut v = Violations::default();
        let page_size = v.check(
            "page_size",
            match u32::try_from(req.page_size) {
                Ok(0) => Ok(DEFAULT_PAGE_SIZE),
                Ok(n) => Ok(n.min(MAX_PAGE_SIZE)),
                Err(_) => Err("must not be negative".to_owned()),
            },
        );
        let symbol = v.check(
            "symbol",
            if req.symbol.is_empty() { Ok(None) } else { Symbol::parse(&req.symbol).map(Some) },
        );
        let status = v.check("status", status_filter(req.status));
        let query = (|| {
            Some(ListQuery {
                filter: OrderFilter { symbol: symbol?, status: status? },
                page_size: page_size?,
                page_token: req.page_token,
            })
        })();
        v.into_result(query)
    }
}

impl TryFrom<proto::CancelOrderRequest> for OrderId {
    type Error = Error;

    fn try_from(req: proto::CancelOrderRequest) -> Result<Self, Error> {
        OrderId::parse(&req.order_id).map_err(|why| Error::invalid("order_id", why))
    }
}

fn timestamp(t: Timestamp) -> ProtoTimestamp {
    let micros = t.as_micros();
    ProtoTimestamp {
        seconds: micros.div_euclid(1_000_000),
        // In 0..1_000_000_000, so the cast cannot truncate.
        nanos: (micros.rem_euclid(1_000_000) * 1_000) as i32,
    }
}

impl From<Order> for proto::Order {
    fn from(o: Order) -> Self {
        Self {
            order_id: o.order_id.to_string(),
            client_request_id: o.client_request_id.to_string(),
            account_id: o.account_id.as_str().to_owned(),
            symbol: o.symbol.as_str().to_owned(),
            side: match o.side {
                Side::Buy => proto::Side::Buy,
                Side::Sell => proto::Side::Sell,
            } as i32,
            order_type: match o.order_type {
                OrderType::Limit => proto::OrderType::Limit,
                OrderType::Market => proto::OrderType::Market,
            } as i32,
            quantity: o.quantity.to_string(),
            limit_price: o.limit_price.map(|p| p.to_string()).unwrap_or_default(),
            time_in_force: match o.time_in_force {
                TimeInForce::Gtc => proto::TimeInForce::Gtc,
                TimeInForce::Ioc => proto::TimeInForce::Ioc,
                TimeInForce::Fok => proto::TimeInForce::Fok,
            } as i32,
            status: match o.status {
                OrderStatus::New => proto::OrderStatus::New,
                OrderStatus::Canceled => proto::OrderStatus::Canceled,
            } as i32,
            create_time: Some(timestamp(o.create_time)),
            update_time: Some(timestamp(o.update_time)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_keep_microseconds_before_and_after_the_epoch() {
        let t = timestamp(Timestamp::from_micros(1_700_000_000_123_456));
        assert_eq!((t.seconds, t.nanos), (1_700_000_000, 123_456_000));
        let t = timestamp(Timestamp::from_micros(-1));
        assert_eq!((t.seconds, t.nanos), (-1, 999_999_000));
    }
}
