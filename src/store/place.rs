//! The PlaceOrder transaction (docs/design.md, "PlaceOrder, exactly once"), written once for every
//! engine: each engine supplies the four statements ([`PlaceTx`]) and runs
//! [`place`] inside its own transaction, committing on success.
//!
//! The unique key `(account_id, client_request_id)` is the guard: the key row
//! is inserted with `on conflict do nothing`, and the order only if it was. On Postgres (READ
//! COMMITTED) a racing duplicate's insert waits on the unique index until the
//! first transaction ends, so every duplicate resolves to the one order.
//!
//! **Time is the engine's, read at the write.** Whether a key is live, when a
//! new key and its order are created and when they expire are decided by the
//! engine's clock when the statement runs (Postgres: the database server's
//! `clock_timestamp()`, one clock for every replica; SQLite: the server's
//! clock read under the write lock), never by when the call arrived. And a
//! key's lifetime is held by its order as well as by its row: a key is
//! inserted only if no order placed with it is younger than the lifetime,
//! so a purge (or a replica whose clock runs ahead) deleting a key row early
//! cannot turn a retry into a second order. Two orders of one key are always
//! at least the lifetime apart, on the engine's clock.

use std::{future::Future, time::Duration};

use super::Placement;
use crate::{
    domain::{AccountId, ClientRequestId, Fingerprint, NewOrder, Order, OrderId, Timestamp},
    error::Error,
};

/// How many times [`place`] tries before answering `KeyInUse`.
const ROUNDS: usize = 3;

/// A key row to write; its times are the engine's to set.
#[derive(Debug)]
pub(super) struct KeyRecord<'a> {
    pub account_id: &'a AccountId,
    pub client_request_id: ClientRequestId,
    pub fingerprint: Fingerprint,
    pub order_id: OrderId,
    /// How long the key lives from its creation.
    pub ttl: Duration,
}

impl<'a> KeyRecord<'a> {
    /// The key row of `new`, naming a freshly generated order id, and the
    /// order it creates (its times are set when it is written).
    pub(super) fn new(account: &'a AccountId, new: &NewOrder, ttl: Duration) -> (Self, Order) {
        let record = KeyRecord {
            account_id: account,
            client_request_id: new.client_request_id,
            fingerprint: new.fingerprint(),
            order_id: OrderId::generate(),
            ttl,
        };
        let order = new.clone().into_order(account.clone(), record.order_id, Timestamp::from_micros(0));
        (record, order)
    }
}

/// `order` created at `at`.
pub(super) fn stamped(mut order: Order, at: Timestamp) -> Order {
    order.create_time = at;
    order.update_time = at;
    order
}

/// What binds a key now: its row and the order it names, or, where the row
/// is gone (purged), the newest order placed with the key while that order is
/// younger than the key lifetime.
#[derive(Debug, Clone)]
pub(super) struct StoredKey {
    /// The request's fingerprint, when read from the key row.
    pub fingerprint: Option<Vec<u8>>,
    /// Whether the key binds (unexpired) on the engine's clock.
    pub live: bool,
    pub order: Order,
}

/// The statements of the PlaceOrder transaction, on an open transaction.
/// Every time they read or write is the engine's clock at that statement.
pub(super) trait PlaceTx: Send {
    /// Inserts the key and its new `order` unless the key exists or an
    /// order placed with the key is younger than `key.ttl`; the creation
    /// time it wrote if it inserted both.
    fn insert_key_and_order(
        &mut self,
        key: &KeyRecord<'_>,
        order: &Order,
    ) -> impl Future<Output = Result<Option<Timestamp>, Error>> + Send;

    /// What binds the key now (see [`StoredKey`]), in one statement where
    /// the row exists.
    fn read_key(
        &mut self,
        account: &AccountId,
        key: ClientRequestId,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<StoredKey>, Error>> + Send;

    /// Overwrites the key row if it has expired; the new creation time if
    /// it did.
    fn replace_expired_key(
        &mut self,
        key: &KeyRecord<'_>,
    ) -> impl Future<Output = Result<Option<Timestamp>, Error>> + Send;

    /// Inserts a new order.
    fn insert_order(&mut self, order: &Order) -> impl Future<Output = Result<(), Error>> + Send;
}

/// Places `new` for `account` within `tx`: creates the order, replays the
/// order the live key points to, or refuses a key reused with other fields.
/// The caller commits when this returns `Ok`, and rolls back otherwise.
pub(super) async fn place(
    tx: &mut impl PlaceTx,
    account: &AccountId,
    new: NewOrder,
    ttl: Duration,
) -> Result<(Order, Placement), Error> {
    let (record, order) = KeyRecord::new(account, &new, ttl);
    // Another transaction can change the key between two statements only by
    // purging or replacing an expired row; each such change ends the next
    // round, so a few rounds almost always suffice.
    for _ in 0..ROUNDS {
        if let Some(at) = tx.insert_key_and_order(&record, &order).await? {
            return Ok((stamped(order, at), Placement::Created));
        }
        match tx.read_key(account, record.client_request_id, ttl).await? {
            None => continue, // purged in between: insert again
            Some(stored) if stored.live => {
                return answer_live(stored, &new).map(|order| (order, Placement::Replayed));
            }
            Some(_) => {}
        }
        if let Some(at) = tx.replace_expired_key(&record).await? {
            let order = stamped(order, at);
            tx.insert_order(&order).await?;
            return Ok((order, Placement::ExpiredReuse));
        }
        // Another call replaced the expired key first: read it again.
    }
    // Nothing was written (every round ended before a write took): a
    // retryable answer, not INTERNAL.
    tracing::warn!(rounds = ROUNDS, "the idempotency key changed on every round; answering KeyInUse");
    Err(Error::KeyInUse)
}

/// The steps of [`place`] that need no transaction around them: a new key
/// creates its order (one statement of `insert_key_and_order`, atomic on its
/// own where the engine makes it one), a live key is answered by [`replay`].
/// `None` when the key has expired: that takes [`place`] in a transaction.
pub(super) async fn place_new_or_live(
    conn: &mut impl PlaceTx,
    account: &AccountId,
    new: &NewOrder,
    ttl: Duration,
) -> Result<Option<(Order, Placement)>, Error> {
    let (record, order) = KeyRecord::new(account, new, ttl);
    if let Some(at) = conn.insert_key_and_order(&record, &order).await? {
        return Ok(Some((stamped(order, at), Placement::Created)));
    }
    replay(conn.read_key(account, new.client_request_id, ttl).await?, new)
}

/// Answers from a stored key read beforehand (on a reader beside the writer,
/// or outside a transaction) when it is live: the persisted order if the
/// request is the same, `KeyReused` if not; `None` when the key is new or
/// expired, and the write flow decides.
pub(super) fn replay(stored: Option<StoredKey>, new: &NewOrder) -> Result<Option<(Order, Placement)>, Error> {
    match stored {
        Some(stored) if stored.live => {
            answer_live(stored, new).map(|order| Some((order, Placement::Replayed)))
        }
        _ => Ok(None),
    }
}

/// The order of a live key if `new` is the same request, else `KeyReused`.
/// Without the key row's fingerprint (purged), the fields are compared.
fn answer_live(stored: StoredKey, new: &NewOrder) -> Result<Order, Error> {
    let mismatched = new.mismatched_fields(&stored.order);
    let same = match &stored.fingerprint {
        Some(fingerprint) => *fingerprint == new.fingerprint().0,
        None => mismatched.is_empty(),
    };
    if same {
        return Ok(stored.order);
    }
    Err(Error::KeyReused { order_id: stored.order.order_id, mismatched })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{OrderType, PositiveDecimal, Side, Symbol, TimeInForce};

    /// Statements that find the key taken at every insert and gone at every
    /// read: the interleaving of a purge and a replica replacing the key on
    /// every round, which no real database can be made to repeat on demand.
    struct EverChangingKey {
        writes: usize,
    }

    impl PlaceTx for EverChangingKey {
        async fn insert_key_and_order(
            &mut self,
            _: &KeyRecord<'_>,
            _: &Order,
        ) -> Result<Option<Timestamp>, Error> {
            Ok(None)
        }
        async fn read_key(
            &mut self,
            _: &AccountId,
            _: ClientRequestId,
            _: Duration,
        ) -> Result<Option<StoredKey>, Error> {
            Ok(None)
        }
        async fn replace_expired_key(&mut self, _: &KeyRecord<'_>) -> Result<Option<Timestamp>, Error> {
            Ok(None)
        }
        async fn insert_order(&mut self, _: &Order) -> Result<(), Error> {
            self.writes += 1;
            Ok(())
        }
    }

    /// A key that changes on every round ends in a retryable `ABORTED`
    /// (it was `INTERNAL`, which callers do not retry), having written nothing.
    #[tokio::test]
    async fn a_key_changed_on_every_round_answers_a_retryable_aborted() {
        let new = NewOrder {
            client_request_id: ClientRequestId::parse("0b6e8a53-2a4e-4c8e-9d62-3f1b1f0e6a01").unwrap(),
            symbol: Symbol::parse("AAPL").unwrap(),
            side: Side::Buy,
            order_type: OrderType::Market,
            quantity: PositiveDecimal::parse("1").unwrap(),
            limit_price: None,
            time_in_force: TimeInForce::Gtc,
        };
        let mut tx = EverChangingKey { writes: 0 };
        let error = place(&mut tx, &AccountId::anonymous(), new, Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(error, Error::KeyInUse), "{error:?}");
        assert_eq!(error.code(), tonic::Code::Aborted);
        assert_eq!(tx.writes, 0);
    }
}
