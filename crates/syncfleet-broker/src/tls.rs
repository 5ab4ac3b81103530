//! TLS to the broker, from the files an `amqps://` URL names
//! ([`BrokerTls`]): for AMQP through lapin, and for the management API's
//! HTTPS. Both check the broker's certificate, chain and host, against the
//! system's CAs and `cacertfile`'s.

use std::sync::Arc;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use syncfleet_core::config::BrokerTls;

/// lapin's TLS settings: `cacertfile`'s CAs trusted besides the system's,
/// and the client certificate, read now (renewed files are picked up at
/// the next connection).
pub(crate) fn amqp(tls: &BrokerTls) -> Result<OwnedTLSConfig, String> {
    let read = |name: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("{name}: cannot read {}: {e}", path.display()))
    };
    let cert_chain = match &tls.ca_file {
        Some(path) => Some(
            String::from_utf8(read("cacertfile", path)?)
                .map_err(|_| format!("cacertfile: {} is not a PEM file", path.display()))?,
        ),
        None => None,
    };
    let identity = match &tls.client {
        Some((cert, key)) => Some(OwnedIdentity::PKCS8 {
            pem: read("certfile", cert)?,
            key: read("keyfile", key)?,
        }),
        None => None,
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

/// A connector for the management API over HTTPS, presenting the client
/// certificate too, for a management listener that asks for one.
pub(crate) fn https(tls: &BrokerTls) -> Result<tokio_rustls::TlsConnector, String> {
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if let Some(path) = &tls.ca_file {
        let shown = path.display();
        for cert in CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cacertfile: cannot read {shown}: {e}"))?
        {
            let cert = cert.map_err(|e| format!("cacertfile: {shown}: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("cacertfile: {shown}: {e}"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let config = match &tls.client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let (shown_cert, shown_key) = (cert.display(), key.display());
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("certfile: cannot read {shown_cert}: {e}"))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("keyfile: cannot read {shown_key}: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("certfile {shown_cert} and keyfile {shown_key}: {e}"))?
        }
    };
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}
