//! `/metrics`, `/healthz` and `/readyz` for the long-running commands.
//!
//! The exposition comes from `metrics-exporter-prometheus`; the HTTP side is
//! a few lines of tokio, since three fixed GET routes need no framework.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use syncfleet_core::health;
use syncfleet_core::shutdown::ShutdownSignal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Installs the metrics recorder and serves the endpoints on `addr` until
/// shutdown. An address that cannot be bound is logged, not fatal: a worker
/// without metrics still does its work.
pub async fn start(addr: SocketAddr, mut shutdown: ShutdownSignal) {
    let handle = match PrometheusBuilder::new()
        .set_buckets(&[
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ])
        .and_then(|b| b.install_recorder())
    {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "metrics disabled: cannot install the recorder");
            return;
        }
    };
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(%addr, error = %e, "metrics endpoint disabled: cannot bind");
            return;
        }
    };
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = shutdown.wait() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    // Out of file descriptors, say: the error repeats
                    // until some close, so wait rather than spin.
                    Err(e) => {
                        tracing::debug!(error = %e, "metrics endpoint: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            tokio::spawn(respond(stream, handle.clone()));
        }
    });
}

async fn respond(mut stream: tokio::net::TcpStream, handle: PrometheusHandle) {
    let mut buf = [0u8; 2048];
    let n = match tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf))
        .await
    {
        Ok(Ok(n)) => n,
        _ => return,
    };
    let request = String::from_utf8_lossy(&buf[..n]);
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let (status, content_type, body) = match path {
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", handle.render()),
        "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
        "/readyz" if health::is_ready() => ("200 OK", "text/plain", "ready\n".to_string()),
        "/readyz" => (
            "503 Service Unavailable",
            "text/plain",
            "not ready\n".to_string(),
        ),
        _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}
