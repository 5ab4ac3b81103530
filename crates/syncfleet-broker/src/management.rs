//! Queue depth from RabbitMQ's management API: ready *and* unacked
//! messages, which AMQP's passive declare cannot tell.
//!
//! One GET per queue over HTTP/1.0 (so the body ends with the connection,
//! no chunked decoding), plain or over TLS, with basic auth from the URL.

use std::time::Duration;

use rustls::pki_types::ServerName;
use syncfleet_core::config::BrokerTls;
use syncfleet_core::secret::{SecretUrl, percent_decode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The management API, reached as its URL says.
pub struct Management {
    url: SecretUrl,
    /// For an `https://` URL.
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Management {
    /// The API at `url`, trusting for HTTPS the system's CAs and those of
    /// the broker URL's `cacertfile`.
    pub fn new(url: &SecretUrl, tls: &BrokerTls) -> Result<Self, String> {
        let tls = match url.expose().starts_with("https://") {
            true => Some(crate::tls::https(tls)?),
            false => None,
        };
        Ok(Self {
            url: url.clone(),
            tls,
        })
    }

    /// Ready, unacked and consumers of `queue` in `vhost`.
    pub async fn queue_counts(&self, vhost: &str, queue: &str) -> Result<QueueCounts, String> {
        let target = request(self.url.expose(), vhost, queue)?;
        let exchange = async {
            let stream = tokio::net::TcpStream::connect(&target.address)
                .await
                .map_err(|e| e.to_string())?;
            match &self.tls {
                None => send(stream, &target.request).await,
                Some(connector) => {
                    let name = ServerName::try_from(target.host.clone())
                        .map_err(|e| format!("{}: {e}", target.host))?;
                    let stream = connector
                        .connect(name, stream)
                        .await
                        .map_err(|e| e.to_string())?;
                    send(stream, &target.request).await
                }
            }
        };
        let response = tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .map_err(|_| "the management API did not answer within 5 s".to_string())??;
        counts(&response)
    }
}

/// Sends the request and reads the response to the connection's end.
async fn send(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    request: &str,
) -> Result<Vec<u8>, String> {
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    match stream.read_to_end(&mut response).await {
        Ok(_) => Ok(response),
        // A server may close without TLS's close_notify; a cut body
        // fails to parse.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {
            Ok(response)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Ready, unacked and consumers of `queue` in `vhost`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueCounts {
    pub ready: u64,
    pub unacked: u64,
    pub consumers: u64,
}

/// The counts in a response.
fn counts(response: &[u8]) -> Result<QueueCounts, String> {
    let text = String::from_utf8_lossy(response);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!(
            "the management API answered {}",
            head.lines().next().unwrap_or("")
        ));
    }
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
    // A count left out (the statistics not collected yet, or turned off)
    // is no zero.
    let n = |field: &str| {
        v.get(field)
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| format!("the management API's answer has no {field}"))
    };
    Ok(QueueCounts {
        ready: n("messages_ready")?,
        unacked: n("messages_unacknowledged")?,
        consumers: n("consumers")?,
    })
}

/// Where to send one queue's GET, and the request.
#[derive(Debug)]
struct Target {
    /// `host:port`.
    address: String,
    /// The host alone, whose certificate HTTPS checks.
    host: String,
    request: String,
}

fn request(url: &str, vhost: &str, queue: &str) -> Result<Target, String> {
    let (rest, default_port) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(rest), _) => (rest, 80),
        (_, Some(rest)) => (rest, 443),
        _ => return Err("the management URL must start with http:// or https://".into()),
    };
    let (authority, _) = rest.split_once('/').unwrap_or((rest, ""));
    let (credentials, host) = match authority.rsplit_once('@') {
        Some((c, h)) => (Some(c), h),
        None => (None, authority),
    };
    // A URL without a port means the scheme's own.
    let (address, host) = match host.rsplit_once(':') {
        Some((name, port)) if !port.contains(']') => (host.to_string(), name),
        _ => (format!("{host}:{default_port}"), host),
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let path = format!("/api/queues/{}/{}", encode(vhost), encode(queue));
    let mut request =
        format!("GET {path} HTTP/1.0\r\nHost: {address}\r\nAccept: application/json\r\n");
    if let Some(c) = credentials {
        // The URL's user and password are percent-encoded (`p%40ss` for
        // `p@ss`); basic auth wants them as they are.
        let (user, password) = c.split_once(':').unwrap_or((c, ""));
        let plain = format!("{}:{}", percent_decode(user), percent_decode(password));
        request.push_str(&format!(
            "Authorization: Basic {}\r\n",
            base64(plain.as_bytes())
        ));
    }
    request.push_str("\r\n");
    Ok(Target {
        address,
        host,
        request,
    })
}

/// Percent-encodes a path segment.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn base64(input: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The vhost of an AMQP URL (`amqp://h/%2f` → `/`).
pub fn vhost(amqp_url: &str) -> String {
    let rest = amqp_url.split_once("://").map_or(amqp_url, |(_, r)| r);
    let path = rest.split_once('/').map_or("", |(_, p)| p);
    let path = path.split(['?', '#']).next().unwrap_or("");
    if path.is_empty() {
        return "/".into();
    }
    percent_decode(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_what_http_needs() {
        assert_eq!(base64(b"guest:guest"), "Z3Vlc3Q6Z3Vlc3Q=");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(encode("/"), "%2F");
        assert_eq!(encode("sf.work"), "sf.work");
        assert_eq!(vhost("amqp://g:g@h:5672/%2f"), "/");
        assert_eq!(vhost("amqp://h/prod"), "prod");
        assert_eq!(vhost("amqp://h"), "/");
        assert_eq!(percent_decode("p%40ss%2F%zz%4"), "p@ss/%zz%4");
        let get = request("http://u:p%40ss@mq/%2f", "/", "sf.work").unwrap();
        assert_eq!((get.address.as_str(), get.host.as_str()), ("mq:80", "mq"));
        assert!(
            get.request
                .starts_with("GET /api/queues/%2F/sf.work HTTP/1.0\r\nHost: mq:80\r\n")
        );
        assert!(
            get.request
                .contains(&format!("Authorization: Basic {}\r\n", base64(b"u:p@ss")))
        );
        let get = request("http://mq:15672", "/", "q").unwrap();
        assert_eq!(get.address, "mq:15672");
        let get = request("https://u:p@mq.example.com:15671/", "/", "q").unwrap();
        assert_eq!(
            (get.address.as_str(), get.host.as_str()),
            ("mq.example.com:15671", "mq.example.com")
        );
        assert_eq!(request("https://mq", "/", "q").unwrap().address, "mq:443");
        assert_eq!(
            request("https://[::1]:15671", "/", "q").unwrap().host,
            "::1"
        );
        assert!(request("ftp://mq", "/", "q").is_err());
    }
}
