//! CancelOrder: NEW becomes CANCELED once; retries and races succeed; replays
//! of PlaceOrder see the change.

use std::time::Duration;

use order_service::proto::{CancelOrderRequest, OrderStatus};
use tokio::task::JoinSet;
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::{Engine, engine_tests, limit_order, new_key, spawn_app};

fn cancel(order_id: &str) -> CancelOrderRequest {
    CancelOrderRequest { order_id: order_id.to_owned() }
}

async fn cancel_turns_new_into_canceled_and_a_second_cancel_returns_it_unchanged(engine: Engine) {
    let mut app = spawn_app(engine).await;
    let placed = app.place(limit_order(&new_key())).await.order.unwrap();
    app.clock.advance(Duration::from_secs(5));

    let canceled = app.client.cancel_order(cancel(&placed.order_id)).await.unwrap().into_inner();
    assert_eq!(canceled.status, OrderStatus::Canceled as i32);
    assert_eq!(canceled.create_time, placed.create_time);
    let (created, updated) = (placed.create_time.unwrap(), canceled.update_time.unwrap());
    match engine {
        // SQLite reads the server's clock, which the test moved 5 s.
        Engine::Sqlite => assert_eq!(updated.seconds, created.seconds + 5),
        // Postgres reads its own clock, which no test moves.
        Engine::Postgres => assert!((updated.seconds, updated.nanos) > (created.seconds, created.nanos)),
    }
    assert_eq!((&canceled.order_id, &canceled.quantity), (&placed.order_id, &placed.quantity));

    app.clock.advance(Duration::from_secs(5));
    let again = app.client.cancel_order(cancel(&placed.order_id.to_uppercase())).await.unwrap().into_inner();
    assert_eq!(again, canceled, "a repeated cancel changes nothing");
}

async fn cancelling_an_unknown_or_malformed_order_fails_clearly(engine: Engine) {
    let mut app = spawn_app(engine).await;
    let unknown = app.client.cancel_order(cancel(&uuid::Uuid::now_v7().to_string())).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    for bad in ["", "42", "0123456789abcdef0123456789abcdef"] {
        let status = app.client.cancel_order(cancel(bad)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
        let details = status.get_error_details();
        assert_eq!(details.bad_request().expect("BadRequest").field_violations[0].field, "order_id");
    }
}

/// Records every status change of an order in `status_changes`.
async fn audit_status_changes(app: &crate::helpers::TestApp) {
    let sql = match app.engine {
        Engine::Sqlite => {
            "create table status_changes (order_id text);
             create trigger audit after update of status on orders when new.status <> old.status
             begin insert into status_changes values (new.order_id); end;"
        }
        Engine::Postgres => {
            "create table status_changes (order_id uuid);
             create function audit() returns trigger language plpgsql as
               $$ begin insert into status_changes values (new.order_id); return new; end $$;
             create trigger audit after update of status on orders for each row
               when (new.status is distinct from old.status) execute function audit();"
        }
    };
    app.db().await.execute(sql).await;
}

async fn twenty_concurrent_cancels_of_one_order_all_succeed_with_one_state_change(engine: Engine) {
    let mut app = spawn_app(engine).await;
    audit_status_changes(&app).await;
    let placed = app.place(limit_order(&new_key())).await.order.unwrap();
    app.clock.advance(Duration::from_secs(1));

    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(20));
    let mut calls = JoinSet::new();
    for _ in 0..20 {
        let mut client = app.client.clone();
        let (id, barrier) = (placed.order_id.clone(), barrier.clone());
        calls.spawn(async move {
            barrier.wait().await;
            client.cancel_order(cancel(&id)).await
        });
    }
    let answers: Vec<_> =
        calls.join_all().await.into_iter().map(|r| r.expect("every cancel succeeds")).collect();
    let first = answers[0].get_ref().clone();
    assert_eq!(first.status, OrderStatus::Canceled as i32);
    for answer in &answers {
        assert_eq!(answer.get_ref(), &first, "every caller sees the one cancelled order");
    }
    assert_eq!(app.count("status_changes").await, 1, "one state change");
}

async fn a_place_order_retried_after_a_cancel_replays_the_cancelled_order(engine: Engine) {
    let mut app = spawn_app(engine).await;
    let key = new_key();
    let placed = app.place(limit_order(&key)).await.order.unwrap();
    app.client.cancel_order(cancel(&placed.order_id)).await.unwrap();

    let replay = app.place(limit_order(&key)).await;
    assert!(replay.replayed);
    let order = replay.order.unwrap();
    assert_eq!(order.order_id, placed.order_id);
    assert_eq!(order.status, OrderStatus::Canceled as i32, "the replay shows the current state");
    assert_eq!(app.count("orders").await, 1);
}

engine_tests!(
    cancel_turns_new_into_canceled_and_a_second_cancel_returns_it_unchanged,
    cancelling_an_unknown_or_malformed_order_fails_clearly,
    twenty_concurrent_cancels_of_one_order_all_succeed_with_one_state_change,
    a_place_order_retried_after_a_cancel_replays_the_cancelled_order,
);
