//! The serving certificate, reloaded when its files change. Kubernetes Secret volumes replace
//! files by swapping a `..data` symlink, which file-change notifications miss, so the files are
//! polled and compared by content. A pair that fails to load leaves the last good one in place.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{path}: no PEM certificate found ({why}): give the serving certificate chain in PEM")]
    NoCertificate { path: PathBuf, why: String },
    #[error("{path}: no PEM private key found ({why}): give the serving key in PEM (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf, why: String },
    #[error("{path}: unsupported private key: {why}")]
    BadKey { path: PathBuf, why: String },
    #[error("{key} does not belong to the certificate in {cert}: give a matching pair")]
    Mismatch { cert: PathBuf, key: PathBuf },
}

/// How errors name a pair held in memory.
const IN_MEMORY: &str = "<memory>";

/// Certificate resolver that serves the newest good pair loaded from two files.
#[derive(Debug)]
pub struct ReloadingCertificate {
    /// The certificate and key files, when the pair comes from files.
    files: Option<(PathBuf, PathBuf)>,
    current: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    source: (Vec<u8>, Vec<u8>),
}

impl ReloadingCertificate {
    /// Loads the pair once; fails when the files do not hold a usable pair.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        let source = read_pair(cert_path, key_path)?;
        let key = certified_key(cert_path, key_path, &source)?;
        Ok(Self {
            files: Some((cert_path.to_owned(), key_path.to_owned())),
            current: RwLock::new(Loaded { key, source }),
        })
    }

    /// A pair held in memory (self-signed mode), replaced with `install`; no files involved.
    pub fn from_pem(cert: &[u8], key: &[u8]) -> Result<Self, TlsError> {
        let source = (cert.to_vec(), key.to_vec());
        let key = certified_key(Path::new(IN_MEMORY), Path::new(IN_MEMORY), &source)?;
        Ok(Self { files: None, current: RwLock::new(Loaded { key, source }) })
    }

    /// Serves `cert`/`key` from now on; `Ok(false)` when they are what is served already.
    pub fn install(&self, cert: &[u8], key: &[u8]) -> Result<bool, TlsError> {
        self.replace((cert.to_vec(), key.to_vec()))
    }

    fn replace(&self, source: (Vec<u8>, Vec<u8>)) -> Result<bool, TlsError> {
        if self.current.read().is_ok_and(|loaded| loaded.source == source) {
            return Ok(false);
        }
        let (cert_path, key_path) = self.paths();
        let key = certified_key(cert_path, key_path, &source)?;
        if let Ok(mut loaded) = self.current.write() {
            *loaded = Loaded { key, source };
        }
        Ok(true)
    }

    fn paths(&self) -> (&Path, &Path) {
        match &self.files {
            Some((cert, key)) => (cert, key),
            None => (Path::new(IN_MEMORY), Path::new(IN_MEMORY)),
        }
    }

    /// Reads the files again. `Ok(true)` when a new pair is now served, `Ok(false)` when they are
    /// unchanged (or there are no files), `Err` when they changed but do not load (the previous
    /// pair stays).
    pub fn reload(&self) -> Result<bool, TlsError> {
        match &self.files {
            Some((cert, key)) => self.replace(read_pair(cert, key)?),
            None => Ok(false),
        }
    }

    /// Polls the files every `interval` for as long as the process runs; a pair held in memory
    /// is replaced by its owner with `install`, so there is nothing to poll.
    pub fn watch(self: Arc<Self>, interval: Duration, on_reload: impl Fn(Result<bool, &TlsError>) + Send + 'static) {
        if self.files.is_none() {
            return;
        }
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                match self.reload() {
                    Ok(changed) => on_reload(Ok(changed)),
                    Err(e) => on_reload(Err(&e)),
                }
            }
        });
    }

    pub fn server_config(self: Arc<Self>) -> rustls::ServerConfig {
        let mut config = rustls::ServerConfig::builder().with_no_client_auth().with_cert_resolver(self);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config
    }
}

impl ResolvesServerCert for ReloadingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|loaded| loaded.key.clone())
    }
}

fn read_pair(cert: &Path, key: &Path) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let read = |path: &Path| std::fs::read(path).map_err(|error| TlsError::Read { path: path.to_owned(), error });
    Ok((read(cert)?, read(key)?))
}

fn certified_key(
    cert_path: &Path,
    key_path: &Path,
    (cert, key): &(Vec<u8>, Vec<u8>),
) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::NoCertificate { path: cert_path.to_owned(), why: e.to_string() })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: cert_path.to_owned(), why: "the file is empty".to_owned() });
    }
    let key = PrivateKeyDer::from_pem_slice(key)
        .map_err(|e| TlsError::NoKey { path: key_path.to_owned(), why: e.to_string() })?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| TlsError::BadKey { path: key_path.to_owned(), why: e.to_string() })?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|_| TlsError::Mismatch { cert: cert_path.to_owned(), key: key_path.to_owned() })?;
    Ok(Arc::new(certified))
}
