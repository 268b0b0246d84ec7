//! TLS for the node's listener (HTTPS, WSS) and for its links to other nodes, when the binary is
//! built with the `tls` feature (`--features tls`; `--features cluster` has it too).
//!
//! Without the feature the same names exist, but [`Acceptor`] and [`Connector`] have no values:
//! [`acceptor`] and [`connector`] refuse with `TlsError::NotBuilt`, so a node configured for
//! TLS never falls back to plain HTTP — it does not start, and says how to build one that does.
//! The quick start's default build leaves out `rustls`, `ring` and the PEM readers, a sixth of
//! its cold build.

pub use imp::{Acceptor, ClientStream, Connector, ServerStream, TlsError, acceptor, connector};

#[cfg(feature = "tls")]
mod imp {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use std::path::Path;
    use std::sync::Arc;
    use tokio::net::TcpStream;
    use tokio_rustls::rustls;

    /// TLS failures at startup.
    #[derive(Debug, thiserror::Error)]
    pub enum TlsError {
        #[error("reading {path}: {source}")]
        Read {
            path: String,
            #[source]
            source: rustls_pki_types::pem::Error,
        },
        #[error("{0} holds no certificate")]
        NoCert(String),
        #[error("TLS configuration: {0}")]
        Config(#[from] rustls::Error),
    }

    pub type ServerStream = tokio_rustls::server::TlsStream<TcpStream>;
    pub type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

    /// Accepts TLS connections with the node's certificate.
    #[derive(Clone)]
    pub struct Acceptor(tokio_rustls::TlsAcceptor);

    impl Acceptor {
        pub async fn accept(&self, tcp: TcpStream) -> std::io::Result<ServerStream> {
            self.0.accept(tcp).await
        }
    }

    /// Opens TLS connections to other nodes, trusting the configured roots.
    #[derive(Clone)]
    pub struct Connector(tokio_rustls::TlsConnector);

    impl Connector {
        /// `host` is the name (or IP address) the peer's certificate must be for.
        pub async fn connect(&self, host: &str, tcp: TcpStream) -> Result<ClientStream, String> {
            let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
            self.0.connect(name, tcp).await.map_err(|e| e.to_string())
        }
    }

    fn reading(path: &Path) -> impl Fn(rustls_pki_types::pem::Error) -> TlsError {
        let path = path.display().to_string();
        move |source| TlsError::Read {
            path: path.clone(),
            source,
        }
    }

    /// The acceptor of `cert` (the chain) and `key` (PEM files).
    pub fn acceptor(cert: &Path, key: &Path) -> Result<Acceptor, TlsError> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(reading(cert))?
            .collect::<Result<_, _>>()
            .map_err(reading(cert))?;
        if certs.is_empty() {
            return Err(TlsError::NoCert(cert.display().to_string()));
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(reading(key))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Acceptor(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
    }

    /// A client that trusts the certificates in `ca` (PEM), for node-to-node HTTPS.
    pub fn connector(ca: &Path) -> Result<Connector, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).map_err(reading(ca))? {
            roots.add(cert.map_err(reading(ca))?)?;
        }
        if roots.is_empty() {
            return Err(TlsError::NoCert(ca.display().to_string()));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Connector(tokio_rustls::TlsConnector::from(Arc::new(
            config,
        ))))
    }
}

#[cfg(not(feature = "tls"))]
mod imp {
    use std::path::Path;
    use tokio::net::TcpStream;

    /// TLS failures at startup: in a build without TLS, any TLS setting.
    #[derive(Debug, thiserror::Error)]
    pub enum TlsError {
        #[error(
            "this signalpost was built without TLS; build it with `cargo build --release --features tls` (or put a TLS-terminating proxy in front)"
        )]
        NotBuilt,
    }

    pub type ServerStream = TcpStream;
    pub type ClientStream = TcpStream;

    /// No value exists: [`acceptor`] always refuses.
    #[derive(Clone)]
    pub enum Acceptor {}

    impl Acceptor {
        pub async fn accept(&self, _tcp: TcpStream) -> std::io::Result<ServerStream> {
            match *self {}
        }
    }

    /// No value exists: [`connector`] always refuses.
    #[derive(Clone)]
    pub enum Connector {}

    impl Connector {
        pub async fn connect(&self, _host: &str, _tcp: TcpStream) -> Result<ClientStream, String> {
            match *self {}
        }
    }

    pub fn acceptor(_cert: &Path, _key: &Path) -> Result<Acceptor, TlsError> {
        Err(TlsError::NotBuilt)
    }

    pub fn connector(_ca: &Path) -> Result<Connector, TlsError> {
        Err(TlsError::NotBuilt)
    }
}

#[cfg(all(test, not(feature = "tls")))]
mod tests {
    use super::*;

    #[test]
    fn a_build_without_tls_refuses_tls_settings_and_says_how_to_get_them() {
        let e = acceptor("c.pem".as_ref(), "k.pem".as_ref()).err().unwrap();
        assert!(e.to_string().contains("--features tls"), "{e}");
        assert!(connector("ca.pem".as_ref()).is_err());
    }
}
