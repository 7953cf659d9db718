//! Development certificates (rcgen): a CA, server certificates for local names and
//! client certificates, as PEM. `ticker certs` writes them to files; the tests make
//! fresh ones per run, so nothing depends on a committed certificate's expiry. The
//! server only reads PEM files (`tls`); it never generates anything.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

pub use rcgen::Error;

/// The names a development server certificate covers.
pub const LOCAL_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// A certificate and its private key, PEM encoded.
#[derive(Debug, Clone)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (clock skew) for `days` days.
    pub fn days(days: i64) -> Validity {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(days),
        }
    }

    /// Expired yesterday: for tests of refusal.
    pub fn expired() -> Validity {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::days(30),
            not_after: now - Duration::days(1),
        }
    }
}

/// A certificate authority that signs server and client certificates.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    pem: Pem,
}

impl DevCa {
    /// A new CA named `name`, valid for `validity`.
    pub fn new(name: &str, validity: Validity) -> Result<DevCa, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let pem = Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        };
        Ok(DevCa {
            issuer: Issuer::new(params, key),
            pem,
        })
    }

    /// A CA from its PEM certificate and key (a `ticker certs` directory).
    pub fn from_pem(cert: &str, key: &str) -> Result<DevCa, Error> {
        let issuer = Issuer::from_ca_cert_pem(cert, KeyPair::from_pem(key)?)?;
        Ok(DevCa {
            issuer,
            pem: Pem {
                cert: cert.to_string(),
                key: key.to_string(),
            },
        })
    }

    /// The CA's own certificate and key.
    pub fn pem(&self) -> &Pem {
        &self.pem
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server(&self, names: &[&str], validity: Validity) -> Result<Pem, Error> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, validity)
    }

    /// A client certificate whose subject is `CN=<name>`.
    pub fn client(&self, name: &str, validity: Validity) -> Result<Pem, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, validity)
    }

    fn sign(&self, mut params: CertificateParams, validity: Validity) -> Result<Pem, Error> {
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_reloaded_from_pem_signs_like_the_original() {
        let ca = DevCa::new("test CA", Validity::days(1)).unwrap();
        let again = DevCa::from_pem(&ca.pem().cert, &ca.pem().key).unwrap();
        let client = again.client("alice", Validity::days(1)).unwrap();
        assert!(client.cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(client.key.contains("PRIVATE KEY"));
    }
}
