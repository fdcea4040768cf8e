//! What the cache fetches through: the `TokenSource` trait and the errors a fetch can end in.
//! The configured credentials implement it (`credentials::CredentialSource`).

use std::future::Future;
use std::pin::Pin;

use crate::token::{Token, TokenError};

/// Something that fetches ID tokens: the configured credentials in production, a script in tests.
pub trait TokenSource: Send + Sync + 'static {
    fn fetch<'a>(&'a self, audience: &'a str) -> Pin<Box<dyn Future<Output = Result<Token, FetchError>> + Send + 'a>>;
}

/// Why a fetch failed. `Config` errors are the caller's to fix and are shown in `/readyz`;
/// `Transient` ones are retried with backoff.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Transient(String),
    #[error("{source_name} answered {status}: {message}")]
    Config { source_name: &'static str, status: u16, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl FetchError {
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Config { .. } | Self::Invalid(_))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Transient(_) => "transient",
            Self::Config { .. } => "config",
            Self::Invalid(_) => "invalid",
        }
    }
}

impl From<TokenError> for FetchError {
    fn from(e: TokenError) -> Self {
        Self::Invalid(e.to_string())
    }
}
