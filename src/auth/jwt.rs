//! JWT bearer tokens: the verification key (an HS256 secret, or an RS256, ES256 or
//! EdDSA public key: one algorithm, nothing else accepted), the claim checks, and
//! minting development tokens for `ticker token`.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::{Entitlements, Principal};

/// Shortest HS256 secret accepted (RFC 7518 §3.2: at least the hash size).
pub const MIN_SECRET_BYTES: usize = 32;

/// Where the verification key comes from.
#[derive(Debug, Clone)]
pub enum JwtKey {
    /// A shared HS256 secret; surrounding whitespace (a trailing newline) is ignored.
    Secret(PathBuf),
    /// A PEM public key: RSA (RS256), P-256 (ES256) or Ed25519 (EdDSA).
    Public(PathBuf),
}

/// `--jwt-*` settings.
#[derive(Debug, Clone)]
pub struct JwtSettings {
    pub key: JwtKey,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
}

/// Why a token was refused (for the log and the metrics, never for the caller).
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("this server does not use tokens")]
    Disabled,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("algorithm {0:?} is not the one this server accepts")]
    Algorithm(String),
    #[error("bad signature")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (nbf)")]
    NotYetValid,
    #[error("wrong issuer")]
    Issuer,
    #[error("wrong audience")]
    Audience,
    #[error("bad claims: {0}")]
    Claims(String),
}

impl JwtError {
    pub fn reason(&self) -> &'static str {
        match self {
            JwtError::Disabled => "disabled",
            JwtError::Malformed(_) => "malformed",
            JwtError::Algorithm(_) => "algorithm",
            JwtError::Signature => "signature",
            JwtError::Expired => "expired",
            JwtError::NotYetValid => "not_yet_valid",
            JwtError::Issuer => "issuer",
            JwtError::Audience => "audience",
            JwtError::Claims(_) => "claims",
        }
    }
}

/// A refused key file, naming the file and the problem.
#[derive(Debug, thiserror::Error)]
#[error("JWT key {path}: {problem}")]
pub struct JwtKeyError {
    pub path: PathBuf,
    pub problem: String,
}

/// The claims tickerd reads. Types are strict: `exp` as a string, say, is refused.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    #[allow(dead_code)] // checked by jsonwebtoken; typed here so a string is refused
    nbf: Option<u64>,
    #[serde(default)]
    symbols: Option<Words>,
    #[serde(default)]
    scope: Option<Words>,
}

/// A claim given as a space-separated string or as a list.
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(untagged)]
enum Words {
    One(String),
    Many(Vec<String>),
}

impl Words {
    fn iter(&self) -> impl Iterator<Item = &str> {
        let (one, many) = match self {
            Words::One(s) => (Some(s.split_whitespace()), None),
            Words::Many(v) => (None, Some(v.iter().map(String::as_str))),
        };
        one.into_iter().flatten().chain(many.into_iter().flatten())
    }
}

/// Verifies tokens with one key and algorithm.
pub struct JwtVerifier {
    key: DecodingKey,
    algorithm: Algorithm,
    validation: Validation,
    leeway: Duration,
}

impl JwtVerifier {
    pub fn load(settings: &JwtSettings) -> Result<JwtVerifier, JwtKeyError> {
        let (key, algorithm) = match &settings.key {
            JwtKey::Secret(path) => (
                DecodingKey::from_secret(&read_secret(path)?),
                Algorithm::HS256,
            ),
            JwtKey::Public(path) => read_public_key(path)?,
        };
        let mut validation = Validation::new(algorithm);
        validation.algorithms = vec![algorithm];
        validation.leeway = settings.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        match &settings.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &settings.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Ok(JwtVerifier {
            key,
            algorithm,
            validation,
            leeway: settings.leeway,
        })
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The principal a token names, or why it is refused.
    pub fn verify(&self, token: &str) -> Result<Principal, JwtError> {
        // The header is checked here first, so that `alg: none` or a confused
        // algorithm is named as such in the log rather than as a parse failure.
        let alg = header_alg(token)?;
        if alg != format!("{:?}", self.algorithm) {
            return Err(JwtError::Algorithm(alg));
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.into_kind() {
                ErrorKind::InvalidSignature => JwtError::Signature,
                ErrorKind::ExpiredSignature => JwtError::Expired,
                ErrorKind::ImmatureSignature => JwtError::NotYetValid,
                ErrorKind::InvalidIssuer => JwtError::Issuer,
                ErrorKind::InvalidAudience => JwtError::Audience,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    JwtError::Algorithm(alg.clone())
                }
                ErrorKind::MissingRequiredClaim(c) => JwtError::Claims(format!("{c} missing")),
                ErrorKind::InvalidClaimFormat(c) => JwtError::Claims(format!("{c} malformed")),
                ErrorKind::Json(e) => JwtError::Claims(e.to_string()),
                other => JwtError::Malformed(format!("{other:?}")),
            },
        )?;
        let claims = data.claims;
        if claims.sub.is_empty() {
            return Err(JwtError::Claims("sub is empty".into()));
        }
        let entitlements = match &claims.symbols {
            Some(words) => Entitlements::parse(words.iter()),
            None => Entitlements::parse([]),
        };
        let can_publish = claims
            .scope
            .as_ref()
            .is_some_and(|s| s.iter().any(|w| w == "publish"));
        Ok(Principal {
            name: claims.sub,
            entitlements,
            can_publish,
            expires: Some(UNIX_EPOCH + Duration::from_secs(claims.exp) + self.leeway),
        })
    }
}

fn header_alg(token: &str) -> Result<String, JwtError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("not three dot-separated parts".into()));
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|e| JwtError::Malformed(format!("header: {e}")))?;
    #[derive(Deserialize)]
    struct Alg {
        alg: String,
    }
    let parsed: Alg =
        serde_json::from_slice(&bytes).map_err(|e| JwtError::Malformed(format!("header: {e}")))?;
    Ok(parsed.alg)
}

/// Reads an HS256 secret file (surrounding whitespace ignored, at least 32 bytes).
pub fn read_secret(path: &Path) -> Result<Vec<u8>, JwtKeyError> {
    let fail = |problem: String| JwtKeyError {
        path: path.to_path_buf(),
        problem,
    };
    let bytes = std::fs::read(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    let secret = bytes.trim_ascii().to_vec();
    if secret.len() < MIN_SECRET_BYTES {
        return Err(fail(format!(
            "secret is {} bytes; HS256 needs at least {MIN_SECRET_BYTES} (try `openssl rand -base64 48`)",
            secret.len()
        )));
    }
    Ok(secret)
}

fn read_public_key(path: &Path) -> Result<(DecodingKey, Algorithm), JwtKeyError> {
    let fail = |problem: String| JwtKeyError {
        path: path.to_path_buf(),
        problem,
    };
    let pem = std::fs::read(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    if pem.windows(11).any(|w| w == b"PRIVATE KEY") {
        return Err(fail(
            "this is a private key; give the issuer's public key".into(),
        ));
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((key, Algorithm::RS256));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        return Ok((key, Algorithm::ES256));
    }
    if let Ok(key) = DecodingKey::from_ed_pem(&pem) {
        return Ok((key, Algorithm::EdDSA));
    }
    Err(fail("not a PEM RSA, P-256 or Ed25519 public key".into()))
}

/// What `ticker token` puts in a development token.
#[derive(Debug, Clone)]
pub struct MintClaims {
    pub sub: String,
    /// Entitlement patterns: `AAPL`, `MSFT*`, `*`.
    pub symbols: Vec<String>,
    /// Space-separated scopes, e.g. `publish`.
    pub scope: Option<String>,
    pub ttl: Duration,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

/// An HS256 token signed with `secret`.
pub fn mint(secret: &[u8], claims: &MintClaims) -> Result<String, jsonwebtoken::errors::Error> {
    #[derive(Serialize)]
    struct Out<'a> {
        sub: &'a str,
        iat: u64,
        nbf: u64,
        exp: u64,
        symbols: &'a [String],
        #[serde(skip_serializing_if = "Option::is_none")]
        scope: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        iss: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        aud: Option<&'a str>,
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let out = Out {
        sub: &claims.sub,
        iat: now,
        nbf: now,
        exp: now + claims.ttl.as_secs(),
        symbols: &claims.symbols,
        scope: claims.scope.as_deref(),
        iss: claims.issuer.as_deref(),
        aud: claims.audience.as_deref(),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &out,
        &EncodingKey::from_secret(secret),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn verifier(dir: &Path) -> JwtVerifier {
        let path = dir.join("secret");
        std::fs::write(&path, [SECRET, b"\n"].concat()).unwrap();
        JwtVerifier::load(&JwtSettings {
            key: JwtKey::Secret(path),
            issuer: None,
            audience: None,
            leeway: Duration::ZERO,
        })
        .unwrap()
    }

    fn claims() -> MintClaims {
        MintClaims {
            sub: "alice".into(),
            symbols: vec!["AAPL".into(), "MSFT*".into()],
            scope: Some("read publish".into()),
            ttl: Duration::from_secs(60),
            issuer: None,
            audience: None,
        }
    }

    #[test]
    fn a_minted_token_verifies_to_its_claims() {
        let dir = tempfile::tempdir().unwrap();
        let token = mint(SECRET, &claims()).unwrap();
        let p = verifier(dir.path()).verify(&token).unwrap();
        assert_eq!(p.name, "alice");
        assert!(p.can_publish);
        assert!(p.entitled("AAPL") && p.entitled("MSFT.O") && !p.entitled("GOOG"));
    }

    #[test]
    fn short_secrets_and_private_keys_are_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("short");
        std::fs::write(&path, "tooshort\n").unwrap();
        let e = read_secret(&path).unwrap_err().to_string();
        assert!(e.contains("short") && e.contains("8 bytes"), "{e}");
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\n").unwrap();
        let settings = JwtSettings {
            key: JwtKey::Public(key),
            issuer: None,
            audience: None,
            leeway: Duration::ZERO,
        };
        let e = JwtVerifier::load(&settings).err().unwrap().to_string();
        assert!(e.contains("private key"), "{e}");
    }
}
