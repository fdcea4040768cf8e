//! A throwaway certificate authority for the fakes' HTTPS endpoints.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub struct TestCa {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "wiproxy test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA certificate");
        Self { ca }
    }

    pub fn pem(&self) -> String {
        self.ca.pem()
    }

    /// Writes the CA certificate where `WIPROXY_EXTRA_CA_FILE` can point.
    pub fn write_pem(&self, dir: &Path) -> PathBuf {
        let path = dir.join("test-ca.pem");
        std::fs::write(&path, self.pem()).expect("write CA file");
        path
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }

    /// A certificate for `names` signed by this CA and its key, both PEM (for servers outside
    /// this process, such as nginx in the benchmark).
    pub fn server_pem(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().expect("server key");
        let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("params");
        let cert = params.signed_by(&key, &self.ca).expect("server certificate");
        (cert.pem(), key.serialize_pem())
    }

    /// A TLS server configuration for `names`, offering h2 and HTTP/1.1.
    pub fn server_config(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        let key = KeyPair::generate().expect("server key");
        let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("params");
        let cert = params.signed_by(&key, &self.ca).expect("server certificate");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .expect("server config");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }

    pub fn client_config(&self) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der()).expect("CA root");
        rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth()
    }
}
