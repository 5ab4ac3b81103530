//! Connection URLs whose passwords never reach a log line or an error.

use std::fmt;

/// A connection URL. `Display` and `Debug` mask the password; only
/// [`SecretUrl::expose`] gives the real text, for handing to a driver.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The real URL, password included. Pass it to a driver, never to a log.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact(&self.0)
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({})", self.redacted())
    }
}

/// Masks the password of a `scheme://user:pass@host/...` URL, and of
/// `password=...` in a libpq key/value string or URL query.
///
/// The user information runs to the *last* `@`, as the drivers read it, so
/// a password holding `/`, `?`, `#` or `@` is masked whole (a URL with an
/// `@` further on may lose more than its password, never less). A string
/// that is not quite a URL (`postgres:/app:pw@db`) loses everything between
/// its scheme and its last `@`.
pub fn redact(url: &str) -> String {
    let mut out = url.to_string();
    match out.find("://") {
        Some(scheme_end) => {
            let rest = scheme_end + 3;
            if let Some(at) = out[rest..].rfind('@') {
                let userinfo = &out[rest..rest + at];
                if let Some(colon) = userinfo.find(':') {
                    out.replace_range(rest + colon + 1..rest + at, "***");
                }
            }
        }
        None => {
            if let (Some(colon), Some(at)) = (out.find(':'), out.rfind('@'))
                && colon < at
            {
                out.replace_range(colon + 1..at, "***");
            }
        }
    }
    mask_password_params(&out)
}

/// `%XX` escapes in a URL part (a path with `/` or spaces, a percent-encoded
/// password); a `%` without two hex digits after it stays as it is.
pub fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Masks the value of every `password = value`: a connection string's
/// parameter (`password=pw`), a URL's query (`?password=pw&`), a TOML line
/// quoted in a parse error (`password = "pw"`), in any case, spaced or not,
/// quoted or not.
fn mask_password_params(text: &str) -> String {
    // ASCII lowering keeps every byte where it was.
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut from = 0;
    while let Some(found) = lower[from..].find("password") {
        let key_end = from + found + "password".len();
        let after = &text[key_end..];
        let Some(rest) = after.trim_start().strip_prefix('=') else {
            out.push_str(&text[from..key_end]);
            from = key_end;
            continue;
        };
        let value_at = text.len() - rest.trim_start().len();
        let value = &text[value_at..];
        let len = match value.chars().next() {
            Some(q @ ('"' | '\'')) => value[1..].find(q).map_or(value.len(), |i| i + 2),
            _ => value.find([' ', '&', '\n']).unwrap_or(value.len()),
        };
        out.push_str(&text[from..value_at]);
        out.push_str("***");
        from = value_at + len;
    }
    out.push_str(&text[from..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_passwords_in_every_form() {
        assert_eq!(
            redact("postgres://app:s3cret@db:5432/app"),
            "postgres://app:***@db:5432/app"
        );
        assert_eq!(
            redact("amqp://guest:gu@st@mq/%2f"),
            "amqp://guest:***@mq/%2f"
        );
        assert_eq!(redact("postgres://app@db/app"), "postgres://app@db/app");
        assert_eq!(
            redact("postgres://app:ab/cd?e#f@db:5432/app"),
            "postgres://app:***@db:5432/app"
        );
        assert_eq!(redact("postgres:/app:pw@db/app"), "postgres:***@db/app");
        assert_eq!(redact("postgres://db:5432/app"), "postgres://db:5432/app");
        assert_eq!(
            redact("host=db password=hunter2 user=x"),
            "host=db password=*** user=x"
        );
        assert_eq!(
            redact("postgres://db/app?password=hunter2&sslmode=require"),
            "postgres://db/app?password=***&sslmode=require"
        );
        // Spaced, quoted, in another case: a TOML line, a connection string.
        assert_eq!(redact(r#"password = "s3 cret" # x"#), "password = *** # x");
        assert_eq!(
            redact("host=db PASSWORD = 'pw' user=x"),
            "host=db PASSWORD = *** user=x"
        );
        assert_eq!(redact("the password is wrong"), "the password is wrong");
        let s = SecretUrl::new("postgres://a:b@c/d");
        assert!(!format!("{s} {s:?}").contains(":b@"));
    }
}
