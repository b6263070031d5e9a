//! Orders: the validated request ([`NewOrder`]), the persisted order
//! ([`Order`]) and the fingerprint that tells a retry from a reused key.

use sha2::{Digest, Sha256};

use super::{AccountId, ClientRequestId, OrderId, PositiveDecimal, Symbol, Timestamp};

macro_rules! text_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// The name stored in the database.
            pub fn as_str(&self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }

            /// Parses a name stored in the database.
            pub fn from_str_opt(s: &str) -> Option<Self> {
                match s {
                    $($text => Some(Self::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

text_enum! {
    /// Buy or sell.
    Side {
        /// Buy.
        Buy => "BUY",
        /// Sell.
        Sell => "SELL",
    }
}

text_enum! {
    /// Limit or market.
    OrderType {
        /// At a limit price or better.
        Limit => "LIMIT",
        /// At the market.
        Market => "MARKET",
    }
}

text_enum! {
    /// How long an order stays working.
    TimeInForce {
        /// Good till cancelled (the default).
        Gtc => "GTC",
        /// Immediate or cancel.
        Ioc => "IOC",
        /// Fill or kill.
        Fok => "FOK",
    }
}

text_enum! {
    /// Where an order is in its life.
    OrderStatus {
        /// Accepted and working.
        New => "NEW",
        /// Cancelled.
        Canceled => "CANCELED",
    }
}

/// An order request that passed validation, in normalized form.
///
/// `limit_price` is `Some` exactly for limit orders (validation guarantees it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    /// The idempotency key.
    pub client_request_id: ClientRequestId,
    /// Instrument.
    pub symbol: Symbol,
    /// Buy or sell.
    pub side: Side,
    /// Limit or market.
    pub order_type: OrderType,
    /// How much.
    pub quantity: PositiveDecimal,
    /// Price limit of a limit order.
    pub limit_price: Option<PositiveDecimal>,
    /// Defaults to GTC.
    pub time_in_force: TimeInForce,
}

/// The order fields a key's payload is compared on, in proto field order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderField {
    /// `symbol`
    Symbol,
    /// `side`
    Side,
    /// `order_type`
    OrderType,
    /// `quantity`
    Quantity,
    /// `limit_price`
    LimitPrice,
    /// `time_in_force`
    TimeInForce,
}

impl OrderField {
    /// The proto field name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Symbol => "symbol",
            Self::Side => "side",
            Self::OrderType => "order_type",
            Self::Quantity => "quantity",
            Self::LimitPrice => "limit_price",
            Self::TimeInForce => "time_in_force",
        }
    }
}

#[cfg(test)]
impl NewOrder {
    /// A limit order for one share at 10, good till cancelled: the unit
    /// tests' order.
    pub(crate) fn sample(key: ClientRequestId, symbol: &str) -> Self {
        NewOrder {
            client_request_id: key,
            symbol: Symbol::parse(symbol).unwrap(),
            side: Side::Buy,
            order_type: OrderType::Limit,
            quantity: PositiveDecimal::parse("1").unwrap(),
            limit_price: Some(PositiveDecimal::parse("10").unwrap()),
            time_in_force: TimeInForce::Gtc,
        }
    }
}

impl NewOrder {
    /// SHA-256 over the normalized order fields in a fixed order, each
    /// length-prefixed so no two different payloads encode alike. The key
    /// itself is not part of it: it is what the fingerprint is stored under.
    pub fn fingerprint(&self) -> Fingerprint {
        let limit_price = self.limit_price.map(|p| p.to_string()).unwrap_or_default();
        let quantity = self.quantity.to_string();
        let fields: [&str; 6] = [
            self.symbol.as_str(),
            self.side.as_str(),
            self.order_type.as_str(),
            &quantity,
            &limit_price,
            self.time_in_force.as_str(),
        ];
        let mut hasher = Sha256::new();
        hasher.update(b"orders.v1.PlaceOrder/1");
        for field in fields {
            hasher.update((field.len() as u64).to_be_bytes());
            hasher.update(field.as_bytes());
        }
        Fingerprint(hasher.finalize().into())
    }

    /// The fields in which `order` differs from this request, in proto field
    /// order.
    pub fn mismatched_fields(&self, order: &Order) -> Vec<OrderField> {
        [
            (OrderField::Symbol, self.symbol == order.symbol),
            (OrderField::Side, self.side == order.side),
            (OrderField::OrderType, self.order_type == order.order_type),
            (OrderField::Quantity, self.quantity == order.quantity),
            (OrderField::LimitPrice, self.limit_price == order.limit_price),
            (OrderField::TimeInForce, self.time_in_force == order.time_in_force),
        ]
        .into_iter()
        .filter_map(|(field, equal)| (!equal).then_some(field))
        .collect()
    }

    /// The order this request creates.
    pub fn into_order(self, account_id: AccountId, order_id: OrderId, now: Timestamp) -> Order {
        Order {
            order_id,
            client_request_id: self.client_request_id,
            account_id,
            symbol: self.symbol,
            side: self.side,
            order_type: self.order_type,
            quantity: self.quantity,
            limit_price: self.limit_price,
            time_in_force: self.time_in_force,
            status: OrderStatus::New,
            create_time: now,
            update_time: now,
        }
    }
}

/// Where a page of orders ends: the last order's sort key. Orders sort newest
/// first by `create_time`, ties by `order_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// The last listed order's create time.
    pub create_time: Timestamp,
    /// The last listed order's id.
    pub order_id: OrderId,
}

impl Order {
    /// This order's place in the listing order.
    pub fn cursor(&self) -> Cursor {
        Cursor { create_time: self.create_time, order_id: self.order_id }
    }
}

/// Which orders a listing returns; `None` means no filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderFilter {
    /// Only this symbol.
    pub symbol: Option<Symbol>,
    /// Only this status.
    pub status: Option<OrderStatus>,
}

/// SHA-256 of a request's normalized order fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

/// An order as persisted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// Server-generated id.
    pub order_id: OrderId,
    /// The key that placed it.
    pub client_request_id: ClientRequestId,
    /// Owner.
    pub account_id: AccountId,
    /// Instrument.
    pub symbol: Symbol,
    /// Buy or sell.
    pub side: Side,
    /// Limit or market.
    pub order_type: OrderType,
    /// How much.
    pub quantity: PositiveDecimal,
    /// Price limit of a limit order.
    pub limit_price: Option<PositiveDecimal>,
    /// How long it works.
    pub time_in_force: TimeInForce,
    /// Current status.
    pub status: OrderStatus,
    /// When it was placed.
    pub create_time: Timestamp,
    /// When it last changed.
    pub update_time: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(quantity: &str, limit_price: Option<&str>) -> NewOrder {
        NewOrder {
            client_request_id: ClientRequestId::parse("123e4567-e89b-12d3-a456-426614174000").unwrap(),
            symbol: Symbol::parse("AAPL").unwrap(),
            side: Side::Buy,
            order_type: OrderType::Limit,
            quantity: PositiveDecimal::parse(quantity).unwrap(),
            limit_price: limit_price.map(|p| PositiveDecimal::parse(p).unwrap()),
            time_in_force: TimeInForce::Gtc,
        }
    }

    #[test]
    fn fingerprint_follows_normalized_values() {
        assert_eq!(order("1.50", Some("10")).fingerprint(), order("1.5", Some("10.000")).fingerprint());
        assert_ne!(order("1.5", Some("10")).fingerprint(), order("1.5", Some("11")).fingerprint());
        assert_ne!(order("1.5", Some("10")).fingerprint(), order("1.5", None).fingerprint());
    }

    #[test]
    fn mismatched_fields_come_in_proto_order() {
        let placed = order("1", Some("10")).into_order(
            AccountId::anonymous(),
            OrderId::generate(),
            Timestamp::from_micros(0),
        );
        let mut retry = order("2", Some("11"));
        retry.side = Side::Sell;
        assert_eq!(
            retry.mismatched_fields(&placed),
            [OrderField::Side, OrderField::Quantity, OrderField::LimitPrice]
        );
    }
}
