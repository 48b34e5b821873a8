//! TLS for Postgres connections, verified or not at all.
//!
//! libpq's `sslmode=prefer` and `require` encrypt without checking who answers, which protects
//! little. Here `sslmode=require` means TLS with the server certificate verified against the
//! system's roots (plus `[database] ca_file`) and its name checked against the host; `disable`
//! and `prefer` (the default) connect without TLS, as before, so a local server with a
//! self-signed certificate keeps working without configuration.

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio_postgres::config::SslMode;

/// The connector every Postgres connection of the process uses.
pub type PgTls = tokio_postgres_rustls::MakeRustlsConnect;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("database.ca_file `{path}`: {message}")]
    CaFile { path: String, message: String },
    #[error(
        "no trusted root certificate: the system store is empty and no database.ca_file is set"
    )]
    NoRoots,
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Builds the connector and settles `sslmode`: `require` keeps TLS (verified), anything else
/// becomes `disable`. Returns whether TLS is on.
pub fn configure(
    pg: &mut tokio_postgres::Config,
    ca_file: Option<&str>,
) -> Result<(PgTls, bool), TlsError> {
    let tls = pg.get_ssl_mode() == SslMode::Require;
    if !tls {
        pg.ssl_mode(SslMode::Disable);
    }
    let mut roots = rustls::RootCertStore::empty();
    if tls {
        // Unreadable system certificates are skipped; an empty store is an error below.
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if let Some(path) = ca_file {
            let ca_err = |message: String| TlsError::CaFile {
                path: path.to_string(),
                message,
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| ca_err(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ca_err(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_err("holds no PEM certificate".into()));
            }
            for c in certs {
                roots.add(c).map_err(|e| ca_err(e.to_string()))?;
            }
        }
        if roots.is_empty() {
            return Err(TlsError::NoRoots);
        }
    }
    // An explicit provider: the dependency tree carries more than one, so rustls cannot pick.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok((tokio_postgres_rustls::MakeRustlsConnect::new(config), tls))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn require() -> tokio_postgres::Config {
        tokio_postgres::Config::from_str("postgres://u@localhost/db?sslmode=require").unwrap()
    }

    #[test]
    fn prefer_and_disable_stay_plain_require_keeps_tls() {
        let mut pg = tokio_postgres::Config::from_str("postgres://u@localhost/db").unwrap();
        let (_, on) = configure(&mut pg, None).unwrap();
        assert!(!on);
        assert_eq!(
            pg.get_ssl_mode(),
            SslMode::Disable,
            "prefer never attempts unverified TLS"
        );
        let mut pg = require();
        let (_, on) = configure(&mut pg, None).unwrap();
        assert!(on);
        assert_eq!(pg.get_ssl_mode(), SslMode::Require);
    }

    #[test]
    fn bad_ca_files_are_named() {
        let err =
            |r: Result<(PgTls, bool), TlsError>| r.err().map(|e| e.to_string()).unwrap_or_default();
        let e = err(configure(&mut require(), Some("/nonexistent/ca.pem")));
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let dir = std::env::temp_dir().join(format!("obs-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("not-pem.txt");
        std::fs::write(&f, "hello").unwrap();
        let e = err(configure(&mut require(), f.to_str()));
        assert!(e.contains("no PEM certificate"), "{e}");
    }
}
