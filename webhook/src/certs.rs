//! Self-signed mode: the webhook keeps its own serving certificate. One Secret holds a CA and a
//! serving certificate; whichever replica finds it missing creates it (a create that loses the
//! race reads the winner's), every replica serves from it, the CA goes into the webhook
//! configurations' `caBundle`, and the pair is replaced at two thirds of its lifetime.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use json_patch::{Patch as JsonPatch, PatchOperation};
use jsonptr::PointerBuf;
use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::Client;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
use tracing::{info, warn};

use crate::settings::MANAGER;
use crate::tls::ReloadingCertificate;

const NOT_BEFORE: &str = "wiproxy.io/not-before";
const NOT_AFTER: &str = "wiproxy.io/not-after";

/// Where the certificate lives and whom it is for.
#[derive(Debug, Clone)]
pub struct SelfSigned {
    pub namespace: String,
    pub secret: String,
    /// The Service the API server calls; its DNS names go into the certificate.
    pub service: String,
    pub lifetime: Duration,
    /// Mutating and validating webhook configurations (by name) whose `caBundle` gets the CA.
    pub webhook_configurations: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
    /// Validity, in seconds since the epoch.
    pub not_before: u64,
    pub not_after: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot create the certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("Secret {0} holds no usable certificate after another replica wrote it")]
    Unusable(String),
}

fn epoch(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

fn offset(seconds: u64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(seconds as i64).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

impl SelfSigned {
    pub fn dns_names(&self) -> Vec<String> {
        let (service, namespace) = (&self.service, &self.namespace);
        vec![
            format!("{service}.{namespace}.svc"),
            format!("{service}.{namespace}.svc.cluster.local"),
            format!("{service}.{namespace}"),
            service.clone(),
        ]
    }

    /// A new CA and a serving certificate signed by it, valid from an hour ago (clock skew) for
    /// the configured lifetime.
    pub fn generate(&self, now: SystemTime) -> Result<Pair, CertError> {
        let not_before = epoch(now).saturating_sub(3600);
        let not_after = epoch(now) + self.lifetime.as_secs();
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.distinguished_name.push(DnType::CommonName, format!("{} webhook CA", self.service));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params.not_before = offset(not_before);
        ca_params.not_after = offset(not_after);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(self.dns_names())?;
        params.distinguished_name.push(DnType::CommonName, self.dns_names()[0].clone());
        params.not_before = offset(not_before);
        params.not_after = offset(not_after);
        let cert = params.signed_by(&key, &ca)?;
        Ok(Pair { cert_pem: cert.pem(), key_pem: key.serialize_pem(), ca_pem: ca.pem(), not_before, not_after })
    }

    fn secret_of(&self, pair: &Pair, resource_version: Option<String>) -> Secret {
        let data = BTreeMap::from([
            ("tls.crt".to_owned(), ByteString(pair.cert_pem.clone().into_bytes())),
            ("tls.key".to_owned(), ByteString(pair.key_pem.clone().into_bytes())),
            ("ca.crt".to_owned(), ByteString(pair.ca_pem.clone().into_bytes())),
        ]);
        let annotations = BTreeMap::from([
            (NOT_BEFORE.to_owned(), pair.not_before.to_string()),
            (NOT_AFTER.to_owned(), pair.not_after.to_string()),
        ]);
        Secret {
            metadata: ObjectMeta {
                name: Some(self.secret.clone()),
                namespace: Some(self.namespace.clone()),
                annotations: Some(annotations),
                labels: Some(BTreeMap::from([("app.kubernetes.io/managed-by".to_owned(), MANAGER.to_owned())])),
                resource_version,
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".to_owned()),
            data: Some(data),
            ..Secret::default()
        }
    }
}

/// The pair a Secret holds, when it holds a whole one.
pub fn pair_of(secret: &Secret) -> Option<Pair> {
    let data = secret.data.as_ref()?;
    let text = |key: &str| data.get(key).and_then(|b| String::from_utf8(b.0.clone()).ok()).filter(|s| !s.is_empty());
    let annotations = secret.metadata.annotations.as_ref()?;
    let number = |key: &str| annotations.get(key)?.parse::<u64>().ok();
    Some(Pair {
        cert_pem: text("tls.crt")?,
        key_pem: text("tls.key")?,
        ca_pem: text("ca.crt")?,
        not_before: number(NOT_BEFORE)?,
        not_after: number(NOT_AFTER)?,
    })
}

/// Whether the pair should be replaced: two thirds of its lifetime have passed.
pub fn due(pair: &Pair, now: SystemTime) -> bool {
    let lifetime = pair.not_after.saturating_sub(pair.not_before);
    epoch(now) >= pair.not_before + lifetime * 2 / 3
}

fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409)
}

/// The pair to serve: the Secret's when it is whole and not due, else a new one written to it.
/// Replicas agree through the API server: create-if-absent, and updates bound to the
/// resourceVersion read; the loser of either race takes the winner's pair.
pub async fn ensure(client: &Client, config: &SelfSigned, now: SystemTime) -> Result<Pair, CertError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &config.namespace);
    let current = api.get_opt(&config.secret).await?;
    if let Some(pair) = current.as_ref().and_then(pair_of).filter(|pair| !due(pair, now)) {
        return Ok(pair);
    }
    let fresh = config.generate(now)?;
    let written = match &current {
        None => api.create(&PostParams::default(), &config.secret_of(&fresh, None)).await.map(drop),
        Some(secret) => {
            let version = secret.metadata.resource_version.clone();
            api.replace(&config.secret, &PostParams::default(), &config.secret_of(&fresh, version)).await.map(drop)
        }
    };
    match written {
        Ok(()) => {
            info!(secret = %config.secret, not_after = fresh.not_after, "serving certificate written");
            Ok(fresh)
        }
        Err(e) if is_conflict(&e) => {
            let secret = api.get(&config.secret).await?;
            pair_of(&secret).ok_or_else(|| CertError::Unusable(config.secret.clone()))
        }
        Err(e) => Err(e.into()),
    }
}

/// Puts `ca_pem` into the `caBundle` of every webhook of the configured configurations, with
/// one JSON patch per configuration that needs it.
pub async fn publish_ca(client: &Client, config: &SelfSigned, ca_pem: &str) -> Result<(), CertError> {
    for name in &config.webhook_configurations {
        let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
        update_ca_bundles(&mutating, name, ca_pem, |c| {
            c.webhooks.iter().flatten().map(|w| w.client_config.ca_bundle.clone()).collect()
        })
        .await?;
        let validating: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
        update_ca_bundles(&validating, name, ca_pem, |c| {
            c.webhooks.iter().flatten().map(|w| w.client_config.ca_bundle.clone()).collect()
        })
        .await?;
    }
    Ok(())
}

/// Reads configuration `name` (absent: nothing to do) and patches the webhooks whose `caBundle`
/// differs from `ca_pem`.
async fn update_ca_bundles<K>(
    api: &Api<K>,
    name: &str,
    ca_pem: &str,
    bundles: impl Fn(&K) -> Vec<Option<ByteString>>,
) -> Result<(), CertError>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let Some(current) = api.get_opt(name).await? else { return Ok(()) };
    let encoded = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    if let Some(patch) = ca_patch(&bundles(&current), ca_pem, &encoded) {
        api.patch(name, &PatchParams::apply(MANAGER), &Patch::<()>::Json(patch)).await?;
        info!(configuration = %name, kind = %K::kind(&()), "caBundle updated");
    }
    Ok(())
}

fn ca_patch(bundles: &[Option<ByteString>], ca_pem: &str, encoded: &str) -> Option<JsonPatch> {
    let operations: Vec<PatchOperation> = bundles
        .iter()
        .enumerate()
        .filter(|(_, bundle)| bundle.as_ref().map(|b| b.0.as_slice()) != Some(ca_pem.as_bytes()))
        .map(|(index, _)| {
            let index = index.to_string();
            // `add` sets the member whether or not it exists.
            PatchOperation::Add(json_patch::AddOperation {
                path: PointerBuf::from_tokens(["webhooks", index.as_str(), "clientConfig", "caBundle"]),
                value: serde_json::Value::String(encoded.to_owned()),
            })
        })
        .collect();
    (!operations.is_empty()).then_some(JsonPatch(operations))
}

/// Keeps the served pair current for as long as the process runs: checks the Secret every
/// `interval`, installs a replaced pair and republishes the CA.
pub fn maintain(client: Client, config: SelfSigned, certificate: Arc<ReloadingCertificate>, interval: Duration) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            match ensure(&client, &config, SystemTime::now()).await {
                Ok(pair) => {
                    match certificate.install(pair.cert_pem.as_bytes(), pair.key_pem.as_bytes()) {
                        Ok(true) => info!("serving certificate replaced"),
                        Ok(false) => {}
                        Err(e) => warn!(error = %e, "the Secret's certificate does not load; the previous one stays"),
                    }
                    if let Err(e) = publish_ca(&client, &config, &pair.ca_pem).await {
                        warn!(error = %e, "cannot update caBundle");
                    }
                }
                Err(e) => warn!(error = %e, "cannot check the serving certificate"),
            }
        }
    });
}
