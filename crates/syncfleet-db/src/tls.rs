//! TLS to PostgreSQL, as the URL asks for it with libpq's parameters:
//! `sslmode` and `sslrootcert`.
//!
//! | `sslmode` | TLS | server certificate |
//! | --- | --- | --- |
//! | (none), `disable` | no | |
//! | `prefer` | if the server offers it | not checked |
//! | `require` | yes | not checked (checked as by `verify-ca` when `sslrootcert` is set, as libpq does) |
//! | `verify-ca` | yes | signed by a trusted CA |
//! | `verify-full` | yes | signed by a trusted CA, and for the URL's host |
//!
//! The trusted CAs are those of `sslrootcert` (a PEM file), or the
//! system's with `sslrootcert=system` or without it. One difference from
//! libpq: a URL without `sslmode` does not use TLS (libpq's default is
//! `prefer`), so the copy path costs no encryption unless asked for.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ServerCertVerifierBuilder, WebPkiServerVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use syncfleet_core::secret::percent_decode;
use tokio_postgres::config::SslMode;

/// The TLS connector every PostgreSQL connection of syncfleet uses.
pub type Tls = tokio_postgres_rustls::MakeRustlsConnect;

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Nothing,
    Chain,
    ChainAndHost,
}

/// Reads a database URL: its connection settings with the TLS mode set,
/// and the connector that checks the server as asked. The error says what
/// is wrong with the URL's TLS parameters.
pub fn config(url: &str) -> Result<(tokio_postgres::Config, Tls), String> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut mode = None;
    let mut root = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", v)) => mode = Some(v.to_string()),
            Some(("sslrootcert", v)) => root = Some(percent_decode(v)),
            _ => rest.push(pair),
        }
    }
    let (ssl_mode, check) = match mode.as_deref() {
        None | Some("disable") => (SslMode::Disable, Check::Nothing),
        Some("prefer") => (SslMode::Prefer, Check::Nothing),
        Some("require") if root.is_some() => (SslMode::Require, Check::Chain),
        Some("require") => (SslMode::Require, Check::Nothing),
        Some("verify-ca") => (SslMode::Require, Check::Chain),
        Some("verify-full") => (SslMode::Require, Check::ChainAndHost),
        Some(other) => {
            return Err(format!(
                "sslmode: expected disable, prefer, require, verify-ca or verify-full, got '{other}'"
            ));
        }
    };
    let url = match rest.is_empty() {
        true => base.to_string(),
        false => format!("{base}?{}", rest.join("&")),
    };
    let mut pg: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| crate::error::describe(&e))?;
    pg.ssl_mode(ssl_mode);
    Ok((pg, connector(check, root.as_deref())?))
}

/// The connector for `check`, trusting the CAs of the PEM file `root` (or
/// the system's).
fn connector(check: Check, root: Option<&str>) -> Result<Tls, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let algorithms = provider.signature_verification_algorithms;
    let verifier: Arc<dyn ServerCertVerifier> = match check {
        Check::Nothing => Arc::new(Unchecked(algorithms)),
        Check::Chain => Arc::new(ChainOnly(
            webpki(provider, root)?
                .build()
                .map_err(|e| format!("sslrootcert: {e}"))?,
        )),
        Check::ChainAndHost => webpki(provider, root)?
            .build()
            .map_err(|e| format!("sslrootcert: {e}"))?,
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

fn webpki(
    provider: Arc<CryptoProvider>,
    root: Option<&str>,
) -> Result<ServerCertVerifierBuilder, String> {
    let mut roots = RootCertStore::empty();
    match root {
        Some(path) if path != "system" => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("sslrootcert: cannot read {path}: {e}"))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("sslrootcert: {path}: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("sslrootcert: {path}: {e}"))?;
            }
            if roots.is_empty() {
                return Err(format!("sslrootcert: {path} holds no PEM certificate"));
            }
        }
        _ => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(
                    "no system CA certificates found: set sslrootcert to a PEM file".into(),
                );
            }
        }
    }
    Ok(WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider,
    ))
}

/// `require` and `prefer`: encrypted, but the server is not checked (as
/// libpq does). Its handshake signatures still are.
#[derive(Debug)]
struct Unchecked(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// `verify-ca`: the chain is checked, the host name is not.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libpq_tls_parameters_and_passes_the_rest_on() {
        let (pg, _) = config("postgres://u@h:5433/db?application_name=x").unwrap();
        assert_eq!(pg.get_ssl_mode(), SslMode::Disable, "no TLS unless asked");
        assert_eq!(pg.get_application_name(), Some("x"));
        let (pg, _) = config("postgres://u@h/db?sslmode=require&connect_timeout=3").unwrap();
        assert_eq!(pg.get_ssl_mode(), SslMode::Require);
        let (pg, _) = config("postgres://u@h/db?sslmode=prefer").unwrap();
        assert_eq!(pg.get_ssl_mode(), SslMode::Prefer);
        let e = config("postgres://u@h/db?sslmode=allow").err().unwrap();
        assert!(e.contains("sslmode") && e.contains("'allow'"), "{e}");
        let e = config("postgres://u@h/db?sslmode=verify-full&sslrootcert=%2Fno%2Fsuch.pem")
            .err()
            .unwrap();
        assert!(e.contains("sslrootcert: cannot read /no/such.pem"), "{e}");
    }
}
