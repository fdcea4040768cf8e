//! RS256 JWTs: signing (the fakes mint Google-like ID tokens) and verifying (the fake Cloud
//! Function checks them), with the key published as a JWKS.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::signature::{KeyPair, RsaKeyPair, RsaPublicKeyComponents, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_SHA256};
use serde_json::{json, Value};

/// An RSA key that signs JWTs.
pub struct Signer {
    key: RsaKeyPair,
    pub kid: String,
}

fn pem_der(pem: &str) -> anyhow::Result<Vec<u8>> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    Ok(base64::engine::general_purpose::STANDARD.decode(body)?)
}

impl Signer {
    pub fn from_pem(pem: &str, kid: &str) -> anyhow::Result<Self> {
        let key = RsaKeyPair::from_pkcs8(&pem_der(pem)?).map_err(|e| anyhow::anyhow!("bad RSA key: {e}"))?;
        Ok(Self { key, kid: kid.to_owned() })
    }

    /// The fake Google signing key in `tests/fixtures`.
    pub fn google() -> Self {
        Self::from_pem(include_str!("../fixtures/google-signing-key.pem"), "fake-google-1")
            .expect("the fixture key is a valid RSA key")
    }

    pub fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": self.kid});
        let input =
            format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
        let mut signature = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA256, &ring::rand::SystemRandom::new(), input.as_bytes(), &mut signature)
            .expect("RSA signing does not fail with a valid key");
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    pub fn verifier(&self) -> Verifier {
        let public = RsaPublicKeyComponents::<Vec<u8>>::from(self.key.public_key());
        Verifier { kid: self.kid.clone(), n: public.n, e: public.e }
    }
}

/// The public half: checks signatures, and prints itself as a JWKS.
#[derive(Clone)]
pub struct Verifier {
    kid: String,
    n: Vec<u8>,
    e: Vec<u8>,
}

impl Verifier {
    pub fn jwks(&self) -> Value {
        json!({"keys": [{
            "kty": "RSA", "alg": "RS256", "use": "sig", "kid": self.kid,
            "n": URL_SAFE_NO_PAD.encode(&self.n), "e": URL_SAFE_NO_PAD.encode(&self.e),
        }]})
    }

    /// The claims of `token` when its RS256 signature is this key's; `Err` says why not.
    pub fn verify(&self, token: &str) -> Result<Value, String> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a JWT".into());
        };
        let alg = decode_json(header)?["alg"].clone();
        if alg != "RS256" {
            return Err(format!("unsupported alg {alg}"));
        }
        let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| "signature is not base64url".to_owned())?;
        RsaPublicKeyComponents { n: &self.n, e: &self.e }
            .verify(&RSA_PKCS1_2048_8192_SHA256, format!("{header}.{payload}").as_bytes(), &signature)
            .map_err(|_| "invalid signature".to_owned())?;
        decode_json(payload)
    }
}

fn decode_json(part: &str) -> Result<Value, String> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| "part is not base64url".to_owned())?;
    serde_json::from_slice(&bytes).map_err(|_| "part is not JSON".to_owned())
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}
