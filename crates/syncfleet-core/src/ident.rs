//! SQL identifier quoting.

/// Quotes one identifier the way PostgreSQL's `quote_ident` does, but always:
/// `a"b` becomes `"a""b"`. Always quoting keeps case and keywords intact.
pub fn quote(ident: &str) -> String {
    let mut out = String::with_capacity(ident.len() + 2);
    out.push('"');
    for c in ident.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Quotes each identifier and joins them with `, `, optionally prefixing a
/// table alias (`q."a", q."b"`).
pub fn list<S: AsRef<str>>(idents: &[S], alias: Option<&str>) -> String {
    idents
        .iter()
        .map(|i| match alias {
            Some(a) => format!("{a}.{}", quote(i.as_ref())),
            None => quote(i.as_ref()),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_embedded_quotes_and_keeps_case() {
        assert_eq!(quote("users"), "\"users\"");
        assert_eq!(quote("Weird\"Name"), "\"Weird\"\"Name\"");
        assert_eq!(quote("select"), "\"select\"");
        assert_eq!(list(&["a", "B"], Some("q")), "q.\"a\", q.\"B\"");
    }
}
