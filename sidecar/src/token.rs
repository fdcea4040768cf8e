//! An ID token and the claims the proxy reads from it. The token itself never reaches a log or
//! an error message: `Debug` shows the claims only.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use http::HeaderValue;
use serde::Deserialize;

#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    value: Arc<str>,
    /// `Bearer <value>`, made once for every request that carries the token; `None` when the
    /// value cannot be a header value.
    bearer: Option<HeaderValue>,
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
    pub email: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the credential source answered with something that is not a JWT")]
    NotJwt,
    #[error("the token's claims cannot be read: {0}")]
    Claims(String),
    #[error("the token expired {0} s before it was received")]
    Expired(u64),
}

#[derive(Deserialize)]
struct Claims {
    exp: u64,
    iat: Option<u64>,
    email: Option<String>,
}

/// The non-secret claims of a JWT, as JSON. The signature is never looked at.
pub fn claims(raw: &str) -> Result<serde_json::Value, TokenError> {
    let mut parts = raw.trim().split('.');
    let (Some(_header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::NotJwt);
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| TokenError::Claims(e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| TokenError::Claims(e.to_string()))
}

fn epoch(seconds: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(seconds)
}

impl Token {
    /// Reads the claims of a Google-signed ID token received at `now`. `exp` is required and must
    /// lie ahead: Google's tokens are not always 3600 s, and a clock or server bug can send an
    /// expired one.
    pub fn parse(raw: &str, now: SystemTime) -> Result<Self, TokenError> {
        let claims: Claims = serde_json::from_value(claims(raw)?).map_err(|e| TokenError::Claims(e.to_string()))?;
        let expires_at = epoch(claims.exp);
        if expires_at <= now {
            let late = now.duration_since(expires_at).unwrap_or_default().as_secs();
            return Err(TokenError::Expired(late));
        }
        // A token issued "in the future" (clock skew) counts from now, so its lifetime is not overstated.
        let issued_at = claims.iat.map(epoch).filter(|iat| *iat <= now).unwrap_or(now);
        let value = raw.trim();
        let bearer = HeaderValue::from_str(&format!("Bearer {value}")).ok().map(|mut bearer| {
            bearer.set_sensitive(true);
            bearer
        });
        Ok(Self { value: Arc::from(value), bearer, issued_at, expires_at, email: claims.email })
    }

    /// The bearer token, for the one header it goes into.
    pub fn secret(&self) -> &str {
        &self.value
    }

    /// `Bearer <token>` as a header value, marked sensitive.
    pub fn bearer(&self) -> Option<&HeaderValue> {
        self.bearer.as_ref()
    }

    pub fn lifetime(&self) -> Duration {
        self.expires_at.duration_since(self.issued_at).unwrap_or_default()
    }

    /// How long before `exp` the token stops being served: 30 s, at most a tenth of its lifetime.
    pub fn serve_margin(&self) -> Duration {
        Duration::from_secs(30).min(self.lifetime() / 10)
    }

    /// How long before `exp` a refresh starts: 240 s, at most a third of the lifetime (so short
    /// tokens refresh at about two thirds of their life).
    pub fn refresh_lead(&self) -> Duration {
        Duration::from_secs(240).min(self.lifetime() / 3)
    }

    /// Whether the token may still be sent at `now`.
    pub fn servable(&self, now: SystemTime) -> bool {
        now + self.serve_margin() < self.expires_at
    }

    /// Seconds until `exp`, negative once past.
    pub fn ttl_seconds(&self, now: SystemTime) -> i64 {
        match self.expires_at.duration_since(now) {
            Ok(left) => left.as_secs() as i64,
            Err(past) => -(past.duration().as_secs() as i64),
        }
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("email", &self.email)
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: serde_json::Value) -> String {
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        format!("{}.{}.{}", b64(br#"{"alg":"RS256"}"#), b64(payload.to_string().as_bytes()), b64(b"signature"))
    }

    #[test]
    fn reads_exp_and_margins() {
        let now = epoch(1_000_000);
        let token = Token::parse(&jwt(serde_json::json!({"iat": 1_000_000, "exp": 1_003_600, "email": "a@b"})), now)
            .expect("valid");
        assert_eq!(token.lifetime(), Duration::from_secs(3600));
        assert_eq!(token.serve_margin(), Duration::from_secs(30));
        assert_eq!(token.refresh_lead(), Duration::from_secs(240));
        assert!(token.servable(epoch(1_003_569)));
        assert!(!token.servable(epoch(1_003_570)));
        assert_eq!(token.email.as_deref(), Some("a@b"));
        assert!(!format!("{token:?}").contains(token.secret()));
        let bearer = token.bearer().expect("a header value");
        assert!(bearer.is_sensitive());
        assert_eq!(bearer.to_str().expect("text"), format!("Bearer {}", token.secret()));

        let short = Token::parse(&jwt(serde_json::json!({"iat": 1_000_000, "exp": 1_000_020})), now).expect("valid");
        assert_eq!(short.serve_margin(), Duration::from_secs(2));
        assert_eq!(short.refresh_lead(), Duration::from_secs(20) / 3);
    }

    #[test]
    fn refuses_what_cannot_be_served() {
        let now = epoch(1_000_000);
        assert_eq!(Token::parse("opaque-access-token", now), Err(TokenError::NotJwt));
        assert_eq!(Token::parse(&jwt(serde_json::json!({"exp": 999_000})), now), Err(TokenError::Expired(1000)));
        assert!(matches!(Token::parse(&jwt(serde_json::json!({"iat": 1})), now), Err(TokenError::Claims(_))));
    }
}
