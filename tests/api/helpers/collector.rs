//! A real OTLP/gRPC trace receiver on a loopback port: what an
//! OpenTelemetry collector gets from the server.

use std::{net::SocketAddr, time::Duration};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value::Value},
    trace::v1::Span,
};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

/// One span as exported, with its resource's attributes.
#[derive(Debug, Clone)]
pub struct Exported {
    pub resource: Vec<KeyValue>,
    pub span: Span,
}

impl Exported {
    /// The span's attribute `key`, as text (strings as they are, numbers
    /// and booleans printed).
    pub fn attr(&self, key: &str) -> Option<String> {
        attr(&self.span.attributes, key)
    }

    /// The resource's attribute `key`, as text.
    pub fn resource_attr(&self, key: &str) -> Option<String> {
        attr(&self.resource, key)
    }

    pub fn trace_id(&self) -> String {
        hex::encode(&self.span.trace_id)
    }

    pub fn span_id(&self) -> String {
        hex::encode(&self.span.span_id)
    }

    pub fn parent_span_id(&self) -> String {
        hex::encode(&self.span.parent_span_id)
    }

    /// The span ids this span links to.
    pub fn links(&self) -> Vec<String> {
        self.span.links.iter().map(|link| hex::encode(&link.span_id)).collect()
    }
}

fn attr(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    Some(text(value))
}

fn text(value: &AnyValue) -> String {
    match &value.value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(n)) => n.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

struct Receiver(mpsc::UnboundedSender<Exported>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans.resource.map(|r| r.attributes).unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    let _ = self.0.send(Exported { resource: resource.clone(), span });
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// A running receiver: every span it got, in arrival order.
pub struct Collector {
    pub addr: SocketAddr,
    received: mpsc::UnboundedReceiver<Exported>,
    seen: Vec<Exported>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    /// Serves OTLP/gRPC on a free loopback port.
    pub async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, received) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver(tx)))
            .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), async {
                let _ = stopped.await;
            });
        let task = tokio::spawn(async move {
            server.await.unwrap();
        });
        Collector { addr, received, seen: Vec::new(), stop: Some(stop), task }
    }

    /// `http://ADDR`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits (at most 30 s) until the spans received so far satisfy
    /// `done`, and returns them all.
    pub async fn until(&mut self, what: &str, done: impl Fn(&[Exported]) -> bool) -> Vec<Exported> {
        let wait = async {
            while !done(&self.seen) {
                match self.received.recv().await {
                    Some(span) => self.seen.push(span),
                    None => panic!("the collector stopped while waiting for {what}"),
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(30), wait).await.is_err() {
            panic!("the collector did not get {what} within 30 s; it got {:#?}", self.seen);
        }
        self.seen.clone()
    }

    /// Stops serving and closes the port.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}
