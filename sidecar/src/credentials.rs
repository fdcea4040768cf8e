//! Where ID tokens come from: the GKE metadata server (Workload Identity), a service-account key
//! (signed JWT exchanged at the key's `token_uri`), impersonation through IAM Credentials
//! `generateIdToken` with the metadata server's access token, or Workload Identity Federation
//! (a file-sourced `external_account` configuration: the subject token exchanged at Google's STS,
//! then `generateIdToken` with the federated token).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use serde::Deserialize;
use serde_json::json;

use crate::body::BoxError;
use crate::credential_file::{self, FileError};
use crate::source::{FetchError, TokenSource};
use crate::token::Token;
use crate::upstream::Clients;

const DEFAULT_METADATA_HOST: &str = "169.254.169.254";
const IAM_CREDENTIALS: &str = "https://iamcredentials.googleapis.com";
/// Longest wait for one answer; the GKE metadata server can take seconds on a cache miss.
const FETCH_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest error text kept from a server's answer: room for the GKE metadata server's message
/// on a missing Workload Identity binding (about 330 characters, ending with the link to the
/// how-to) whole.
const MAX_MESSAGE: usize = 512;

/// How the sidecar obtains tokens (`WIPROXY_CREDENTIALS`).
#[derive(Clone)]
pub enum Credentials {
    /// `metadata`: the metadata server at `host` (`GCE_METADATA_HOST`, else 169.254.169.254).
    Metadata { host: String },
    /// `key-file:PATH`: a service-account key.
    KeyFile(ServiceAccountKey),
    /// `impersonate:GSA`: IAM Credentials, authenticated with the metadata server's access token.
    Impersonate { service_account: String, metadata_host: String },
    /// `external-account:PATH`: Workload Identity Federation, for clusters outside GKE.
    ExternalAccount(ExternalAccount),
}

#[derive(Clone, Deserialize)]
pub struct ServiceAccountKey {
    pub client_email: String,
    #[serde(default)]
    pub private_key_id: String,
    private_key: String,
    pub token_uri: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("WIPROXY_CREDENTIALS: {0:?} is not metadata, key-file:PATH, impersonate:GSA or external-account:PATH")]
    Unknown(String),
    #[error("WIPROXY_CREDENTIALS: impersonate:{0:?} is not a Google service account email")]
    BadServiceAccount(String),
    #[error("WIPROXY_CREDENTIALS: cannot read the key file: {0}")]
    ReadKey(FileError),
    #[error("WIPROXY_CREDENTIALS: key file {path} is not a service-account key ({why}): download a JSON key of type service_account")]
    BadKey { path: String, why: String },
    #[error("WIPROXY_CREDENTIALS: cannot read the credential configuration: {0}")]
    ReadExternalAccount(FileError),
    #[error("WIPROXY_CREDENTIALS: {path} is not a usable external_account configuration: {why}")]
    BadExternalAccount { path: String, why: String },
    #[error("WIPROXY_CREDENTIAL_CONFIG_SHA256: {0:?} is not a SHA-256 digest (64 hex digits)")]
    BadDigest(String),
    #[error("WIPROXY_CREDENTIALS: {path} has SHA-256 {actual}, not the {expected} of WIPROXY_CREDENTIAL_CONFIG_SHA256: the credential configuration (the pod's wiproxy.io/credential-configuration annotation) changed after the pod was admitted; nothing was sent. Recreate the pod (kubectl rollout restart) so the webhook writes it again")]
    Tampered { path: String, actual: String, expected: String },
    #[error("WIPROXY_CREDENTIALS: {path} has universe_domain {found:?}, but this sidecar sends tokens only to {configured} (WIPROXY_UNIVERSE_DOMAIN, set from the webhook's --universe-domain); nothing was sent. Fix universe_domain in the configuration, or the webhook's --universe-domain if the cluster really uses another universe")]
    ForeignUniverse { path: String, found: String, configured: String },
}

/// The default universe: Google Cloud's public APIs.
pub const DEFAULT_UNIVERSE_DOMAIN: &str = "googleapis.com";

/// What the sidecar's own environment (immutable once the pod exists) says about Workload
/// Identity Federation: the universe whose STS and IAM Credentials may receive the subject
/// token, and the digest the configuration file must have. The file itself comes from a pod
/// annotation that stays editable after admission, so it is trusted only as far as these allow.
#[derive(Debug, Clone)]
pub struct FederationTrust {
    /// `WIPROXY_UNIVERSE_DOMAIN`, `googleapis.com` when unset.
    pub universe_domain: String,
    /// `WIPROXY_CREDENTIAL_CONFIG_SHA256`, lower-case hex; `None` (no check) when the sidecar
    /// is run by hand without it.
    pub config_sha256: Option<String>,
}

impl Default for FederationTrust {
    fn default() -> Self {
        Self { universe_domain: DEFAULT_UNIVERSE_DOMAIN.to_owned(), config_sha256: None }
    }
}

impl FederationTrust {
    /// Checks the environment's values: `universe_domain` empty means the default.
    pub fn new(universe_domain: &str, config_sha256: Option<&str>) -> Result<Self, CredentialsError> {
        let universe_domain = universe_domain.trim().trim_end_matches('.').to_ascii_lowercase();
        let universe_domain =
            if universe_domain.is_empty() { DEFAULT_UNIVERSE_DOMAIN.to_owned() } else { universe_domain };
        let config_sha256 = match config_sha256.map(str::trim).filter(|d| !d.is_empty()) {
            None => None,
            Some(digest) if digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Some(digest.to_ascii_lowercase())
            }
            Some(other) => return Err(CredentialsError::BadDigest(other.to_owned())),
        };
        Ok(Self { universe_domain, config_sha256 })
    }
}

/// The configured credentials as the cache's token source.
pub struct CredentialSource {
    pub credentials: Credentials,
    pub clients: Clients,
}

impl TokenSource for CredentialSource {
    fn fetch<'a>(&'a self, audience: &'a str) -> Pin<Box<dyn Future<Output = Result<Token, FetchError>> + Send + 'a>> {
        Box::pin(self.credentials.fetch(&self.clients, audience))
    }
}

impl Credentials {
    /// Parses `WIPROXY_CREDENTIALS`; `metadata_host` is `GCE_METADATA_HOST` when set.
    pub fn parse(spec: &str, metadata_host: Option<&str>, trust: &FederationTrust) -> Result<Self, CredentialsError> {
        let metadata_host = metadata_host.filter(|h| !h.is_empty()).unwrap_or(DEFAULT_METADATA_HOST).to_owned();
        let spec = spec.trim();
        if spec.is_empty() || spec == "metadata" {
            return Ok(Self::Metadata { host: metadata_host });
        }
        if let Some(path) = spec.strip_prefix("key-file:") {
            return Ok(Self::KeyFile(ServiceAccountKey::load(Path::new(path))?));
        }
        if let Some(gsa) = spec.strip_prefix("impersonate:") {
            if !wiproxy_common::is_service_account_email(gsa) {
                return Err(CredentialsError::BadServiceAccount(gsa.to_owned()));
            }
            return Ok(Self::Impersonate { service_account: gsa.to_owned(), metadata_host });
        }
        if let Some(path) = spec.strip_prefix("external-account:") {
            return Ok(Self::ExternalAccount(ExternalAccount::load(Path::new(path), trust)?));
        }
        Err(CredentialsError::Unknown(spec.to_owned()))
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Metadata { host } => format!("metadata server {host}"),
            Self::KeyFile(key) => format!("key of {}", key.client_email),
            Self::Impersonate { service_account, .. } => format!("impersonation of {service_account}"),
            Self::ExternalAccount(account) => {
                format!("workload identity federation as {} through {}", account.service_account, account.sts_audience)
            }
        }
    }

    /// Fetches a fresh ID token for `audience`.
    pub async fn fetch(&self, clients: &Clients, audience: &str) -> Result<Token, FetchError> {
        let raw = match self {
            Self::Metadata { host } => metadata_id_token(clients, host, audience).await?,
            Self::KeyFile(key) => key.exchange(clients, audience).await?,
            Self::Impersonate { service_account, metadata_host } => {
                impersonate(clients, metadata_host, service_account, audience).await?
            }
            Self::ExternalAccount(account) => account.id_token(clients, audience).await?,
        };
        Ok(Token::parse(&raw, SystemTime::now())?)
    }
}

impl ServiceAccountKey {
    pub fn load(path: &Path) -> Result<Self, CredentialsError> {
        let name = path.display().to_string();
        let bytes = credential_file::read(path).map_err(CredentialsError::ReadKey)?;
        let key: Self = serde_json::from_slice(&bytes)
            .map_err(|e| CredentialsError::BadKey { path: name.clone(), why: e.to_string() })?;
        key.signer().map_err(|why| CredentialsError::BadKey { path: name, why })?;
        Ok(key)
    }

    fn signer(&self) -> Result<RsaKeyPair, String> {
        let der = pem_body(&self.private_key, "PRIVATE KEY").ok_or("private_key is not a PEM PRIVATE KEY")?;
        RsaKeyPair::from_pkcs8(&der).map_err(|e| format!("private_key is not an RSA PKCS#8 key: {e}"))
    }

    /// The signed JWT assertion asking the token endpoint for an ID token for `audience`.
    fn assertion(&self, audience: &str, now: SystemTime) -> Result<String, FetchError> {
        let iat = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": self.private_key_id});
        let claims = json!({
            "iss": self.client_email,
            "sub": self.client_email,
            "aud": self.token_uri,
            "iat": iat,
            "exp": iat + 3600,
            "target_audience": audience,
        });
        let signing_input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
        let signer = self.signer().map_err(FetchError::Invalid)?;
        let mut signature = vec![0; signer.public().modulus_len()];
        signer
            .sign(&RSA_PKCS1_SHA256, &ring::rand::SystemRandom::new(), signing_input.as_bytes(), &mut signature)
            .map_err(|_| FetchError::Invalid("cannot sign the JWT assertion with the key".to_owned()))?;
        Ok(format!("{signing_input}.{}", b64(&signature)))
    }

    async fn exchange(&self, clients: &Clients, audience: &str) -> Result<String, FetchError> {
        let assertion = self.assertion(audience, SystemTime::now())?;
        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer")
            .append_pair("assertion", &assertion)
            .finish();
        let body = send(clients, form_post(&self.token_uri, form), "token endpoint").await?;
        json_field(&body, "id_token", "token endpoint")
    }
}

fn pem_body(pem: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin)? + begin.len();
    let stop = pem[start..].find(&end)? + start;
    let b64: String = pem[start..stop].chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

async fn metadata_id_token(clients: &Clients, host: &str, audience: &str) -> Result<String, FetchError> {
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("audience", audience)
        .append_pair("format", "full")
        .finish();
    let uri = format!("http://{host}/computeMetadata/v1/instance/service-accounts/default/identity?{query}");
    let request = Request::get(uri).header("Metadata-Flavor", "Google").body(Full::new(Bytes::new()));
    let body = send(clients, request, "metadata server").await?;
    Ok(String::from_utf8_lossy(&body).trim().to_owned())
}

async fn impersonate(
    clients: &Clients,
    metadata_host: &str,
    service_account: &str,
    audience: &str,
) -> Result<String, FetchError> {
    let uri = format!("http://{metadata_host}/computeMetadata/v1/instance/service-accounts/default/token");
    let request = Request::get(uri).header("Metadata-Flavor", "Google").body(Full::new(Bytes::new()));
    let body = send(clients, request, "metadata server").await?;
    let access_token = json_field(&body, "access_token", "metadata server")?;
    let uri = format!("{IAM_CREDENTIALS}/v1/projects/-/serviceAccounts/{service_account}:generateIdToken");
    generate_id_token(clients, &uri, &access_token, audience).await
}

/// IAM Credentials `generateIdToken` at `uri`, authenticated with `access_token`; `includeEmail`
/// so the token carries the `email` claim the expected-GSA check reads.
async fn generate_id_token(
    clients: &Clients,
    uri: &str,
    access_token: &str,
    audience: &str,
) -> Result<String, FetchError> {
    let request = Request::post(uri)
        .header(header::AUTHORIZATION, format!("Bearer {access_token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(json!({"audience": audience, "includeEmail": true}).to_string())));
    let body = send(clients, request, "IAM Credentials").await?;
    json_field(&body, "token", "IAM Credentials")
}

/// The standard `external_account` configuration (what `gcloud iam workload-identity-pools
/// create-cred-config --credential-source-file=… --service-account=…` writes), file-sourced.
#[derive(Clone)]
pub struct ExternalAccount {
    /// The STS audience: the workload identity provider, `//iam.googleapis.com/projects/…/providers/…`.
    pub sts_audience: String,
    subject_token_type: String,
    token_url: String,
    subject_file: PathBuf,
    /// The JSON field that holds the subject token, when the file is JSON rather than text.
    subject_field: Option<String>,
    /// The Google service account the configuration acts as.
    pub service_account: String,
    /// `generateIdToken` for it, on the host of the configuration's impersonation URL.
    id_token_url: String,
    /// The federated access token and when to stop using it. The lock is held across an
    /// exchange, so upstreams that need a token at the same moment share one exchange.
    federated: Arc<tokio::sync::Mutex<Option<(String, SystemTime)>>>,
}

/// Why a configuration is refused: a foreign universe gets its own message.
#[derive(Debug)]
enum Refused {
    Universe(String),
    Other(String),
}

impl From<String> for Refused {
    fn from(why: String) -> Self {
        Self::Other(why)
    }
}

impl From<&str> for Refused {
    fn from(why: &str) -> Self {
        Self::Other(why.to_owned())
    }
}

#[derive(Deserialize)]
struct ExternalAccountFile {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default = "default_universe")]
    universe_domain: String,
    audience: String,
    subject_token_type: String,
    token_url: String,
    credential_source: CredentialSourceFile,
    service_account_impersonation_url: Option<String>,
}

fn default_universe() -> String {
    "googleapis.com".to_owned()
}

#[derive(Deserialize)]
struct CredentialSourceFile {
    file: Option<String>,
    format: Option<SubjectFormat>,
}

#[derive(Deserialize)]
struct SubjectFormat {
    #[serde(rename = "type")]
    kind: String,
    subject_token_field_name: Option<String>,
}

/// RFC 8693 token exchange at Google's STS, with the fields Google's client libraries send for a
/// workload identity pool that then impersonates a service account (google-auth-library-python,
/// `google/auth/external_account.py` and `google/oauth2/sts.py`: form-encoded `grant_type`,
/// `audience`, `scope`, `requested_token_type`, `subject_token`, `subject_token_type`).
const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

impl ExternalAccount {
    /// Reads the configuration at `path`, checked against `trust` before anything else: a file
    /// whose digest or universe the environment does not allow is refused, and nothing is sent.
    pub fn load(path: &Path, trust: &FederationTrust) -> Result<Self, CredentialsError> {
        let name = path.display().to_string();
        let bytes = credential_file::read(path).map_err(CredentialsError::ReadExternalAccount)?;
        if let Some(expected) = &trust.config_sha256 {
            let actual: String = ring::digest::digest(&ring::digest::SHA256, &bytes)
                .as_ref()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            if actual != *expected {
                return Err(CredentialsError::Tampered { path: name, actual, expected: expected.clone() });
            }
        }
        let text = String::from_utf8(bytes).map_err(|_| CredentialsError::BadExternalAccount {
            path: name.clone(),
            why: "it is not UTF-8 JSON".to_owned(),
        })?;
        Self::parse(&text, &trust.universe_domain).map_err(|why| match why {
            Refused::Universe(found) => {
                CredentialsError::ForeignUniverse { path: name, found, configured: trust.universe_domain.clone() }
            }
            Refused::Other(why) => CredentialsError::BadExternalAccount { path: name, why },
        })
    }

    fn parse(text: &str, universe_domain: &str) -> Result<Self, Refused> {
        let file: ExternalAccountFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
        // The universe is the environment's: the file may only agree with it.
        if !file.universe_domain.trim_end_matches('.').eq_ignore_ascii_case(universe_domain) {
            return Err(Refused::Universe(file.universe_domain));
        }
        if file.kind != "external_account" {
            return Err(format!("type is {:?}, not \"external_account\"", file.kind).into());
        }
        let subject_file = file.credential_source.file.filter(|f| !f.is_empty()).ok_or(
            "credential_source.file is missing: only file-sourced subject tokens are supported (create-cred-config --credential-source-file)",
        )?;
        let subject_field =
            match file.credential_source.format {
                None => None,
                Some(format) if format.kind == "text" => None,
                Some(format) if format.kind == "json" => Some(format.subject_token_field_name.ok_or(
                    "credential_source.format.subject_token_field_name is missing for a json subject token file",
                )?),
                Some(format) => {
                    return Err(format!("credential_source.format.type {:?} is not text or json", format.kind).into())
                }
            };
        let impersonation = file.service_account_impersonation_url.ok_or(
            "service_account_impersonation_url is missing: ID tokens are minted for a Google service account (create-cred-config --service-account)",
        )?;
        let (base, service_account) = impersonation
            .strip_suffix(":generateAccessToken")
            .and_then(|rest| rest.rsplit_once("/serviceAccounts/"))
            .filter(|(base, gsa)| base.starts_with("https://") && wiproxy_common::is_service_account_email(gsa))
            .ok_or_else(|| format!("service_account_impersonation_url {impersonation:?} is not https://…/serviceAccounts/GSA:generateAccessToken"))?;
        // The configuration can come from a pod annotation: the subject token and the federated
        // token go to the configured universe's API hosts only, never to a host the file names
        // elsewhere.
        let google_host = |url: &str| {
            url::Url::parse(url).is_ok_and(|u| {
                u.scheme() == "https"
                    && u.username().is_empty()
                    && u.password().is_none()
                    && u.host_str().is_some_and(|h| h.ends_with(&format!(".{universe_domain}")))
            })
        };
        if !google_host(&file.token_url) {
            return Err(format!("token_url {:?} is not an https URL on {universe_domain}", file.token_url).into());
        }
        if !google_host(base) {
            return Err(
                format!("service_account_impersonation_url {impersonation:?} is not on {universe_domain}").into()
            );
        }
        Ok(Self {
            sts_audience: file.audience,
            subject_token_type: file.subject_token_type,
            token_url: file.token_url,
            subject_file: PathBuf::from(subject_file),
            subject_field,
            id_token_url: format!("{base}/serviceAccounts/{service_account}:generateIdToken"),
            service_account: service_account.to_owned(),
            federated: Arc::default(),
        })
    }

    /// An ID token for `audience`: the federated token (cached to its `expires_in`), then
    /// `generateIdToken` for the configured service account. A federated token IAM refuses
    /// (revoked, or expired early) is dropped and exchanged again, once.
    async fn id_token(&self, clients: &Clients, audience: &str) -> Result<String, FetchError> {
        let federated = self.federated_token(clients).await?;
        match generate_id_token(clients, &self.id_token_url, &federated, audience).await {
            Err(FetchError::Config { status: 401, .. }) => {
                self.forget(&federated).await;
                let federated = self.federated_token(clients).await?;
                generate_id_token(clients, &self.id_token_url, &federated, audience).await
            }
            answered => answered,
        }
    }

    async fn forget(&self, refused: &str) {
        let mut slot = self.federated.lock().await;
        if slot.as_ref().is_some_and(|(token, _)| token == refused) {
            *slot = None;
        }
    }

    async fn federated_token(&self, clients: &Clients) -> Result<String, FetchError> {
        let mut slot = self.federated.lock().await;
        if let Some((token, _)) = slot.as_ref().filter(|(_, until)| *until > SystemTime::now()) {
            return Ok(token.clone());
        }
        // Read on every exchange: the kubelet rotates projected tokens in place.
        let subject = self.subject_token().await?;
        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", TOKEN_EXCHANGE)
            .append_pair("audience", &self.sts_audience)
            .append_pair("scope", CLOUD_PLATFORM_SCOPE)
            .append_pair("requested_token_type", ACCESS_TOKEN_TYPE)
            .append_pair("subject_token", &subject)
            .append_pair("subject_token_type", &self.subject_token_type)
            .finish();
        let body = send(clients, form_post(&self.token_url, form), "STS").await?;
        let token = json_field(&body, "access_token", "STS")?;
        let lifetime = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["expires_in"].as_u64())
            .unwrap_or(3600);
        // Stop using it a little before it expires: a tenth of its life, at most a minute.
        let until = SystemTime::now() + Duration::from_secs(lifetime - (lifetime / 10).min(60));
        *slot = Some((token.clone(), until));
        Ok(token)
    }

    async fn subject_token(&self) -> Result<String, FetchError> {
        let path = self.subject_file.display();
        // A missing file is transient (the kubelet writes it soon); a file that is no credential
        // at all (a FIFO, a device, /proc, too large) is the configuration's to fix.
        let bytes = credential_file::read_async(self.subject_file.clone()).await.map_err(|e| match e {
            FileError::Open { .. } | FileError::Read { .. } | FileError::TimedOut { .. } => {
                FetchError::Transient(format!("cannot read the subject token file (credential_source.file): {e}"))
            }
            FileError::NotAFile { .. } | FileError::Pseudo { .. } | FileError::TooLarge { .. } => {
                FetchError::Invalid(format!("credential_source.file refused: {e}"))
            }
        })?;
        let text = String::from_utf8(bytes)
            .map_err(|_| FetchError::Invalid(format!("the subject token file {path} is not UTF-8 text")))?;
        let token = match &self.subject_field {
            None => text.trim().to_owned(),
            Some(field) => serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v[field.as_str()].as_str().map(str::to_owned))
                .ok_or_else(|| {
                    FetchError::Invalid(format!("the subject token file {path} has no string field {field:?}"))
                })?,
        };
        if token.is_empty() {
            return Err(FetchError::Transient(format!("the subject token file {path} is empty")));
        }
        Ok(token)
    }
}

/// A form-encoded POST, as OAuth token endpoints take them.
fn form_post(uri: &str, form: String) -> Result<Request<Full<Bytes>>, http::Error> {
    Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(form)))
}

fn json_field(body: &[u8], field: &str, source_name: &'static str) -> Result<String, FetchError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|_| FetchError::Invalid(format!("{source_name} answered with something that is not JSON")))?;
    value[field]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| FetchError::Invalid(format!("{source_name} answered without {field}")))
}

async fn send(
    clients: &Clients,
    request: Result<Request<Full<Bytes>>, http::Error>,
    source_name: &'static str,
) -> Result<Bytes, FetchError> {
    let request =
        request.map_err(|e| FetchError::Invalid(format!("cannot build the request to {source_name}: {e}")))?;
    let request = request.map(|body| body.map_err(|never| -> BoxError { match never {} }).boxed());
    let response = match tokio::time::timeout(FETCH_TIMEOUT, clients.any.request(request)).await {
        Err(_) => return Err(FetchError::Transient(format!("{source_name} did not answer within {FETCH_TIMEOUT:?}"))),
        Ok(Err(e)) => {
            return Err(FetchError::Transient(format!(
                "cannot reach {source_name}: {}",
                wiproxy_common::error_chain(&e)
            )))
        }
        Ok(Ok(response)) => response,
    };
    let status = response.status();
    let body = tokio::time::timeout(FETCH_TIMEOUT, response.into_body().collect())
        .await
        .map_err(|_| FetchError::Transient(format!("{source_name} stalled while answering")))?
        .map_err(|e| FetchError::Transient(format!("{source_name} broke off its answer: {e}")))?
        .to_bytes();
    if status.is_success() {
        return Ok(body);
    }
    let message = server_message(&body);
    match status {
        StatusCode::TOO_MANY_REQUESTS => Err(FetchError::Transient(format!("{source_name} answered 429: {message}"))),
        s if s.is_server_error() => {
            Err(FetchError::Transient(format!("{source_name} answered {}: {message}", s.as_u16())))
        }
        s => Err(FetchError::Config { source_name, status: s.as_u16(), message }),
    }
}

/// The server's own words, shortened: a JSON `error_description`/`error.message`, else the text.
fn server_message(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let from_json = serde_json::from_str::<serde_json::Value>(&text).ok().and_then(|v| {
        v["error_description"]
            .as_str()
            .or_else(|| v["error"]["message"].as_str())
            .or_else(|| v["error"].as_str())
            .map(str::to_owned)
    });
    let message = from_json.unwrap_or_else(|| text.trim().to_owned());
    let mut message: String = message.chars().take(MAX_MESSAGE).collect();
    if message.is_empty() {
        message = "(no message)".to_owned();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_credential_specs() {
        assert!(
            matches!(Credentials::parse("", None, &FederationTrust::default()), Ok(Credentials::Metadata { host }) if host == "169.254.169.254")
        );
        assert!(
            matches!(Credentials::parse("metadata", Some("127.0.0.1:8080"), &FederationTrust::default()), Ok(Credentials::Metadata { host }) if host == "127.0.0.1:8080")
        );
        assert!(matches!(
            Credentials::parse("impersonate:a@p.iam.gserviceaccount.com", None, &FederationTrust::default()),
            Ok(Credentials::Impersonate { .. })
        ));
        assert!(matches!(
            Credentials::parse("impersonate:nobody", None, &FederationTrust::default()),
            Err(CredentialsError::BadServiceAccount(_))
        ));
        assert!(matches!(
            Credentials::parse("key-file:/nonexistent.json", None, &FederationTrust::default()),
            Err(CredentialsError::ReadKey(_))
        ));
        assert!(matches!(
            Credentials::parse("vault", None, &FederationTrust::default()),
            Err(CredentialsError::Unknown(_))
        ));
    }

    #[test]
    fn external_account_configurations_are_read_as_gcloud_writes_them() {
        let config = |change: serde_json::Value| {
            let mut value = json!({
                "universe_domain": "googleapis.com",
                "type": "external_account",
                "audience": "//iam.googleapis.com/projects/123/locations/global/workloadIdentityPools/onprem/providers/cluster",
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                "token_url": "https://sts.googleapis.com/v1/token",
                "credential_source": {"file": "/var/run/wiproxy/token", "format": {"type": "text"}},
                "service_account_impersonation_url": "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/invoker@p.iam.gserviceaccount.com:generateAccessToken",
            });
            for (key, field) in change.as_object().into_iter().flatten() {
                value[key] = field.clone();
            }
            ExternalAccount::parse(&value.to_string(), DEFAULT_UNIVERSE_DOMAIN).map_err(|why| match why {
                Refused::Universe(found) => format!("universe {found}"),
                Refused::Other(why) => why,
            })
        };
        let account = config(json!({})).expect("the gcloud shape");
        assert_eq!(account.service_account, "invoker@p.iam.gserviceaccount.com");
        assert_eq!(
            account.id_token_url,
            "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/invoker@p.iam.gserviceaccount.com:generateIdToken"
        );
        assert_eq!(account.subject_field, None);
        let json_source = json!({"credential_source": {"file": "/t", "format": {"type": "json", "subject_token_field_name": "id_token"}}});
        assert_eq!(config(json_source).expect("json source").subject_field.as_deref(), Some("id_token"));
        let refusals = [
            (json!({"type": "service_account"}), "external_account"),
            (json!({"credential_source": {"url": "http://169.254.169.254/x"}}), "credential_source.file"),
            (json!({"credential_source": {"file": "/t", "format": {"type": "json"}}}), "subject_token_field_name"),
            (json!({"service_account_impersonation_url": null}), "--service-account"),
            (
                json!({"service_account_impersonation_url": "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/x:generateAccessToken"}),
                "serviceAccounts/GSA",
            ),
            (json!({"token_url": "http://sts.googleapis.com/v1/token"}), "token_url"),
            (json!({"token_url": "https://sts.attacker.example/v1/token"}), "token_url"),
            (
                json!({"service_account_impersonation_url": "https://iamcredentials.attacker.example/v1/projects/-/serviceAccounts/a@p.iam.gserviceaccount.com:generateAccessToken"}),
                "not on googleapis.com",
            ),
            (json!({"token_url": "https://user@sts.googleapis.com/v1/token"}), "token_url"),
            // The file cannot move the universe: a foreign one is refused whatever its URLs say.
            (
                json!({"universe_domain": "evil.example", "token_url": "https://sts.evil.example/v1/token"}),
                "universe evil.example",
            ),
        ];
        for (change, named) in refusals {
            let why = config(change.clone()).err().unwrap_or_default();
            assert!(why.contains(named), "{change}: {why}");
        }
    }

    #[test]
    fn the_environment_decides_the_universe_and_the_configuration() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("credential-configuration.json");
        let write = |universe: &str| {
            let text = json!({
                "universe_domain": universe,
                "type": "external_account",
                "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/c",
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                "token_url": format!("https://sts.{universe}/v1/token"),
                "credential_source": {"file": "/var/run/wiproxy/token"},
                "service_account_impersonation_url": format!("https://iamcredentials.{universe}/v1/projects/-/serviceAccounts/a@p.iam.gserviceaccount.com:generateAccessToken"),
            })
            .to_string();
            std::fs::write(&path, &text).expect("write");
            ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
                .as_ref()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        let digest = write("googleapis.com");
        let trust = |universe: &str, digest: Option<&str>| FederationTrust::new(universe, digest).expect("trust");
        assert!(ExternalAccount::load(&path, &trust("", None)).is_ok(), "by hand: the default universe, no digest");
        assert!(ExternalAccount::load(&path, &trust("googleapis.com", Some(&digest.to_uppercase()))).is_ok());
        let tampered = ExternalAccount::load(&path, &trust("googleapis.com", Some(&"0".repeat(64))));
        let message = tampered.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            message.contains("WIPROXY_CREDENTIAL_CONFIG_SHA256") && message.contains("rollout restart"),
            "{message}"
        );
        let other = ExternalAccount::load(&path, &trust("example-universe.com", None));
        let message = other.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            message.contains("universe_domain \"googleapis.com\"") && message.contains("WIPROXY_UNIVERSE_DOMAIN"),
            "{message}"
        );
        let evil = write("evil.example");
        let foreign = ExternalAccount::load(&path, &trust("googleapis.com", Some(&evil)));
        let message = foreign.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("\"evil.example\"") && message.contains("--universe-domain"), "{message}");
        assert!(
            ExternalAccount::load(&path, &trust("evil.example", Some(&evil))).is_ok(),
            "a universe the webhook chose"
        );
        assert!(matches!(FederationTrust::new("", Some("abc")), Err(CredentialsError::BadDigest(_))));
    }

    #[test]
    fn server_messages_are_short_and_plain() {
        assert_eq!(server_message(br#"{"error":"invalid_grant","error_description":"bad key"}"#), "bad key");
        assert_eq!(server_message(br#"{"error":{"code":403,"message":"denied"}}"#), "denied");
        assert_eq!(server_message(b" Not found \n"), "Not found");
        assert_eq!(server_message(&[b'x'; 1000]).len(), MAX_MESSAGE);
    }
}
