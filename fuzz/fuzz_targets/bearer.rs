//! Bearer-token parsing and JWT verification: arbitrary `authorization` values against
//! each key kind tickerd accepts (HS256 secret, ES256 and EdDSA public keys).
//! Invariants: no panic; a forged token is never accepted; every refusal has one of
//! the documented reasons (the labels of `tickerd_auth_failures_total`).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tickerd::auth::{Authenticator, JwtKey, JwtSettings, JwtVerifier};
use tonic::metadata::{MetadataMap, MetadataValue};

const REASONS: &[&str] = &[
    "missing",
    "scheme",
    "too_large",
    "malformed",
    "signature",
    "algorithm",
    "expired",
    "not_yet_valid",
    "issuer",
    "audience",
    "claims",
    "disabled",
];

fn authenticators() -> &'static Vec<Authenticator> {
    static ALL: OnceLock<Vec<Authenticator>> = OnceLock::new();
    ALL.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tickerd-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let secret = dir.join("secret");
        std::fs::write(&secret, [7u8; 48]).expect("secret");
        let mut keys = vec![JwtKey::Secret(secret)];
        for (name, alg) in [
            ("p256.pem", &rcgen::PKCS_ECDSA_P256_SHA256),
            ("ed25519.pem", &rcgen::PKCS_ED25519),
        ] {
            let pair = rcgen::KeyPair::generate_for(alg).expect("key");
            let path = dir.join(name);
            std::fs::write(&path, pair.public_key_pem()).expect("key file");
            keys.push(JwtKey::Public(path));
        }
        let all = keys
            .into_iter()
            .map(|key| {
                let settings = JwtSettings {
                    key,
                    issuer: Some("fuzz".into()),
                    audience: None,
                    leeway: std::time::Duration::from_secs(30),
                };
                Authenticator::jwt(JwtVerifier::load(&settings).expect("verifier"))
            })
            .collect();
        // The verifiers hold the keys they read: the files are not needed again.
        let _ = std::fs::remove_dir_all(&dir);
        all
    })
}

fuzz_target!(|data: &[u8]| {
    let mut metadata = MetadataMap::new();
    if let Ok(value) = MetadataValue::try_from(data) {
        metadata.insert("authorization", value);
    }
    let text = String::from_utf8_lossy(data);
    for auth in authenticators() {
        match auth.authenticate(&metadata, None) {
            Ok(principal) => panic!("a forged token was accepted: {}", principal.name),
            Err(e) => assert!(
                REASONS.contains(&e.reason()),
                "undocumented reason {}",
                e.reason()
            ),
        }
        let current = tickerd::auth::Principal::anonymous();
        if let Err(e) = auth.refresh(&current, &text) {
            assert!(REASONS.contains(&e.reason()) || e.reason() == "subject_changed");
        } else {
            panic!("a forged in-band token was accepted");
        }
    }
});
