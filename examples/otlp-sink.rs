//! A minimal OTLP/gRPC trace receiver: counts the spans it is sent and
//! prints the count each second it changes, and the span names and
//! attributes of the first few with `--show N`. For benchmarks with a
//! collector up, and to see the service's spans without running an
//! OpenTelemetry collector:
//!
//! ```sh
//! cargo run --release --example otlp-sink -- --listen 127.0.0.1:4317 --show 3 &
//! OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 cargo run --release
//! ```

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use tonic::{Request, Response, Status};

struct Sink {
    spans: Arc<AtomicU64>,
    show: AtomicU64,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        for resource_spans in request.into_inner().resource_spans {
            for scope in &resource_spans.scope_spans {
                for span in &scope.spans {
                    self.spans.fetch_add(1, Ordering::Relaxed);
                    let left = self.show.load(Ordering::Relaxed);
                    if left > 0 {
                        self.show.store(left - 1, Ordering::Relaxed);
                        println!("{span:#?}");
                    }
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("usage: otlp-sink [--listen 127.0.0.1:4317] [--show N]");
        println!(
            "Receives OTLP/gRPC traces, prints the first N spans whole and the count each second it changes."
        );
        return Ok(());
    }
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let listen: SocketAddr = flag("--listen").unwrap_or_else(|| "127.0.0.1:4317".into()).parse()?;
    let show = flag("--show").map_or(Ok(0), |n| n.parse())?;
    let spans = Arc::new(AtomicU64::new(0));
    let counted = spans.clone();
    tokio::spawn(async move {
        let mut last = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = counted.load(Ordering::Relaxed);
            if now != last {
                println!("spans received: {now}");
                last = now;
            }
        }
    });
    eprintln!("receiving OTLP/gRPC traces on {listen}");
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Sink { spans, show: AtomicU64::new(show) }))
        .serve_with_shutdown(listen, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
