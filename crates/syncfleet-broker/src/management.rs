//! Queue depth from RabbitMQ's management API: ready *and* unacked
//! messages, which AMQP's passive declare cannot tell.
//!
//! One GET per queue over plain HTTP/1.0 (so the body ends with the
//! connection, no chunked decoding), with basic auth from the URL.

use std::time::Duration;

use syncfleet_core::secret::SecretUrl;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Ready, unacked and consumers of `queue` in `vhost`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueCounts {
    pub ready: u64,
    pub unacked: u64,
    pub consumers: u64,
}

pub async fn queue_counts(
    url: &SecretUrl,
    vhost: &str,
    queue: &str,
) -> Result<QueueCounts, String> {
    let (host, request) = request(url.expose(), vhost, queue)?;
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(&host)
            .await
            .map_err(|e| e.to_string())?;
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "the management API did not answer within 5 s".to_string())??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!(
            "the management API answered {}",
            head.lines().next().unwrap_or("")
        ));
    }
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
    let n = |field: &str| {
        v.get(field)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    };
    Ok(QueueCounts {
        ready: n("messages_ready"),
        unacked: n("messages_unacknowledged"),
        consumers: n("consumers"),
    })
}

/// The address to connect to and the GET request for one queue.
fn request(url: &str, vhost: &str, queue: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("the management URL must start with http://")?;
    let (authority, _) = rest.split_once('/').unwrap_or((rest, ""));
    let (credentials, host) = match authority.rsplit_once('@') {
        Some((c, h)) => (Some(c), h),
        None => (None, authority),
    };
    // A URL without a port means HTTP's own.
    let host = match host.rsplit_once(':') {
        Some((_, port)) if !port.contains(']') => host.to_string(),
        _ => format!("{host}:80"),
    };
    let path = format!("/api/queues/{}/{}", encode(vhost), encode(queue));
    let mut request =
        format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nAccept: application/json\r\n");
    if let Some(c) = credentials {
        // The URL's user and password are percent-encoded (`p%40ss` for
        // `p@ss`); basic auth wants them as they are.
        let (user, password) = c.split_once(':').unwrap_or((c, ""));
        let plain = format!("{}:{}", decode(user), decode(password));
        request.push_str(&format!(
            "Authorization: Basic {}\r\n",
            base64(plain.as_bytes())
        ));
    }
    request.push_str("\r\n");
    Ok((host, request))
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
    decode(path)
}

/// Percent-decodes URL text (`%2f` → `/`); a `%` without two hex digits
/// after it stays as it is.
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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
        assert_eq!(decode("p%40ss%2F%zz%4"), "p@ss/%zz%4");
        let (host, get) = request("http://u:p%40ss@mq/%2f", "/", "sf.work").unwrap();
        assert_eq!(host, "mq:80");
        assert!(get.starts_with("GET /api/queues/%2F/sf.work HTTP/1.0\r\nHost: mq:80\r\n"));
        assert!(get.contains(&format!("Authorization: Basic {}\r\n", base64(b"u:p@ss"))));
        let (host, _) = request("http://mq:15672", "/", "q").unwrap();
        assert_eq!(host, "mq:15672");
    }
}
