//! What grpcurl and Kubernetes rely on: reflection (v1 and v1alpha) and health.

use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::{v1, v1alpha};

use crate::helpers::{Engine, channel, engine_tests, spawn_app};

async fn reflection_v1_lists_the_services(engine: Engine) {
    let app = spawn_app(engine).await;
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel(app.addr).await);
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut answers = client.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let answer = answers.message().await.unwrap().expect("one answer");
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answer.message_response
    else {
        panic!("unexpected answer {answer:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"orders.v1.OrderService".to_owned()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_owned()), "{names:?}");
}

async fn reflection_v1alpha_lists_the_services_and_describes_error_details(engine: Engine) {
    use v1alpha::{server_reflection_request::MessageRequest, server_reflection_response::MessageResponse};
    let app = spawn_app(engine).await;
    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel(app.addr).await);
    let reqs = [
        MessageRequest::ListServices(String::new()),
        // grpcurl resolves error details by symbol to print them as JSON.
        MessageRequest::FileContainingSymbol("google.rpc.ErrorInfo".to_owned()),
        MessageRequest::FileContainingSymbol("orders.v1.PlaceOrderRequest".to_owned()),
    ]
    .map(|m| v1alpha::ServerReflectionRequest { host: String::new(), message_request: Some(m) });
    let mut answers = client.server_reflection_info(tokio_stream::iter(reqs)).await.unwrap().into_inner();

    let answer = answers.message().await.unwrap().expect("list answer");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("unexpected answer {answer:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"orders.v1.OrderService".to_owned()), "{names:?}");
    for symbol in ["google.rpc.ErrorInfo", "orders.v1.PlaceOrderRequest"] {
        let answer = answers.message().await.unwrap().expect("file answer");
        assert!(
            matches!(answer.message_response, Some(MessageResponse::FileDescriptorResponse(_))),
            "{symbol}: {answer:?}"
        );
    }
}

async fn health_is_serving_for_the_server_and_the_order_service(engine: Engine) {
    let app = spawn_app(engine).await;
    let mut health = HealthClient::new(channel(app.addr).await);
    for service in ["", "orders.v1.OrderService", "liveness"] {
        let resp = health
            .check(HealthCheckRequest { service: service.to_owned() })
            .await
            .unwrap_or_else(|e| panic!("{service:?}: {e}"));
        assert_eq!(resp.into_inner().status(), ServingStatus::Serving, "{service:?}");
    }
    let unknown = health.check(HealthCheckRequest { service: "nope.v1.Nope".to_owned() }).await;
    assert_eq!(unknown.unwrap_err().code(), tonic::Code::NotFound);
}

/// A Watch of a service the server does not know answers SERVICE_UNKNOWN
/// and keeps the stream open, as the health checking spec says (it failed
/// with NOT_FOUND, which client-side health checking reads as unhealthy).
async fn watching_an_unknown_service_answers_service_unknown_and_stays_open(engine: Engine) {
    let app = spawn_app(engine).await;
    let mut health = HealthClient::new(channel(app.addr).await);
    let request = HealthCheckRequest { service: "nope.v1.Nope".to_owned() };
    let mut stream = health.watch(request).await.expect("the stream opens").into_inner();
    let first = stream.message().await.expect("a message").expect("the stream goes on");
    assert_eq!(first.status(), ServingStatus::ServiceUnknown);
    let next = tokio::time::timeout(std::time::Duration::from_millis(300), stream.message()).await;
    assert!(next.is_err(), "the stream stays open and quiet: {next:?}");
}

engine_tests!(
    reflection_v1_lists_the_services,
    reflection_v1alpha_lists_the_services_and_describes_error_details,
    health_is_serving_for_the_server_and_the_order_service,
    watching_an_unknown_service_answers_service_unknown_and_stays_open,
);
