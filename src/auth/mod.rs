//! Who is calling and what they may see: the `Authenticator` turns a request's
//! `authorization: Bearer` token (`jwt`) or client certificate (`PeerInfo`, filled in by
//! the transport's `incoming`)
//! into a `Principal` with per-symbol entitlements, a publish right and an expiry.
//! The service asks it on every call and the session on every in-band token refresh;
//! neither reason nor token ever reaches the caller or the log from here.

pub mod jwt;

use std::{collections::HashSet, net::SocketAddr, sync::Arc, time::SystemTime};

use tonic::metadata::MetadataMap;

pub use jwt::{mint, JwtError, JwtKey, JwtSettings, JwtVerifier, MintClaims};

/// Who is at the other end of a connection, as the transport accepted it; tonic puts
/// it in every request's extensions.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    pub addr: Option<SocketAddr>,
    /// Subject of the verified client certificate (mTLS), e.g. `CN=alice`.
    pub client_subject: Option<Arc<str>>,
}

/// Longest accepted token, in bytes: more is refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The caller of one RPC.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The token's `sub`, the client certificate's subject, or "anonymous".
    pub name: String,
    pub entitlements: Entitlements,
    /// May call Publish (`scope` includes `publish`).
    pub can_publish: bool,
    /// When the credentials stop being valid (token `exp` plus the leeway).
    pub expires: Option<SystemTime>,
}

impl Principal {
    /// Everything allowed: a server without auth.
    pub fn anonymous() -> Principal {
        Principal::unrestricted("anonymous".into())
    }

    fn unrestricted(name: String) -> Principal {
        Principal {
            name,
            entitlements: Entitlements::All,
            can_publish: true,
            expires: None,
        }
    }

    pub fn entitled(&self, symbol: &str) -> bool {
        self.entitlements.allows(symbol)
    }
}

/// The symbols a caller may see: exact names, prefixes ending in `*`, or `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entitlements {
    All,
    Listed {
        exact: HashSet<String>,
        prefixes: Vec<String>,
    },
}

impl Entitlements {
    pub fn parse<'a>(patterns: impl IntoIterator<Item = &'a str>) -> Entitlements {
        let mut exact = HashSet::new();
        let mut prefixes = Vec::new();
        for p in patterns {
            match p.strip_suffix('*') {
                Some("") => return Entitlements::All,
                Some(prefix) => prefixes.push(prefix.to_string()),
                None if !p.is_empty() => {
                    exact.insert(p.to_string());
                }
                None => {}
            }
        }
        Entitlements::Listed { exact, prefixes }
    }

    pub fn allows(&self, symbol: &str) -> bool {
        match self {
            Entitlements::All => true,
            Entitlements::Listed { exact, prefixes } => {
                exact.contains(symbol) || prefixes.iter().any(|p| symbol.starts_with(p.as_str()))
            }
        }
    }
}

/// Why credentials were refused. The caller only ever learns "UNAUTHENTICATED";
/// `reason()` labels `tickerd_auth_failures_total` and the log says the rest.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no authorization metadata")]
    Missing,
    #[error("authorization is not of the form `Bearer <token>`")]
    Scheme,
    #[error("token longer than {MAX_TOKEN_BYTES} bytes")]
    TooLarge,
    #[error(transparent)]
    Jwt(#[from] JwtError),
    #[error("refreshed token names another subject")]
    SubjectChanged,
}

impl AuthError {
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Scheme => "scheme",
            AuthError::TooLarge => "too_large",
            AuthError::Jwt(e) => e.reason(),
            AuthError::SubjectChanged => "subject_changed",
        }
    }
}

/// Checks credentials; cheap to clone.
#[derive(Clone, Default)]
pub struct Authenticator {
    jwt: Option<Arc<JwtVerifier>>,
}

impl Authenticator {
    /// No tokens: callers are their client certificate's subject, or anonymous.
    pub fn none() -> Authenticator {
        Authenticator { jwt: None }
    }

    pub fn jwt(verifier: JwtVerifier) -> Authenticator {
        Authenticator {
            jwt: Some(Arc::new(verifier)),
        }
    }

    /// Whether every call needs a token.
    pub fn requires_token(&self) -> bool {
        self.jwt.is_some()
    }

    /// The caller of a request with `metadata`, over a connection from `peer`.
    pub fn authenticate(
        &self,
        metadata: &MetadataMap,
        peer: Option<&PeerInfo>,
    ) -> Result<Principal, AuthError> {
        let Some(jwt) = &self.jwt else {
            let subject = peer.and_then(|p| p.client_subject.as_deref());
            return Ok(match subject {
                Some(subject) => Principal::unrestricted(subject.to_string()),
                None => Principal::anonymous(),
            });
        };
        let value = metadata.get("authorization").ok_or(AuthError::Missing)?;
        if value.len() > MAX_TOKEN_BYTES + "Bearer ".len() {
            return Err(AuthError::TooLarge);
        }
        let value = value.to_str().map_err(|_| AuthError::Scheme)?;
        let token = value.strip_prefix("Bearer ").ok_or(AuthError::Scheme)?;
        Ok(jwt.verify(token)?)
    }

    /// The caller a bare token names (a WebSocket's first message: browsers cannot set
    /// headers). Only with tokens on.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let jwt = self.jwt.as_ref().ok_or(AuthError::Missing)?;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLarge);
        }
        Ok(jwt.verify(token)?)
    }

    /// The caller after an in-band token refresh: the new token must pass every check
    /// and name the same subject.
    pub fn refresh(&self, current: &Principal, token: &str) -> Result<Principal, AuthError> {
        let jwt = self
            .jwt
            .as_ref()
            .ok_or(AuthError::Jwt(JwtError::Disabled))?;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLarge);
        }
        let next = jwt.verify(token)?;
        if next.name != current.name {
            return Err(AuthError::SubjectChanged);
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entitlements_match_exact_names_prefixes_and_star() {
        let e = Entitlements::parse(["AAPL", "MSFT*", ""]);
        assert!(e.allows("AAPL"));
        assert!(!e.allows("AAPL.L"));
        assert!(e.allows("MSFT"));
        assert!(e.allows("MSFT.O"));
        assert!(!e.allows("GOOG"));
        assert_eq!(Entitlements::parse(["X", "*"]), Entitlements::All);
        assert!(!Entitlements::parse([]).allows("AAPL"));
    }
}
