//! TLS for the server (rustls, TLS 1.2 and 1.3 only): loads the certificate, key and
//! optional client CA from PEM files, refuses bad ones with a message naming the file,
//! and swaps in new files on reload (SIGHUP, `--tls-reload-interval`) so that new
//! handshakes use them while open connections carry on. `incoming` handshakes with the
//! current config; `server` owns the handle.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    RootCertStore, ServerConfig,
};
use tokio_rustls::TlsAcceptor;

/// The PEM files TLS is built from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// With it, every client must present a certificate signed by this CA (mTLS).
    pub client_ca: Option<PathBuf>,
}

/// Why TLS files were refused; each names the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS file {path}: {problem}")]
    File { path: PathBuf, problem: String },
    #[error("TLS certificate {cert} and key {key} do not match: {problem}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        problem: String,
    },
    #[error("TLS client CA {path}: {problem}")]
    ClientCa { path: PathBuf, problem: String },
}

/// What a load put in service, for the log and the metrics.
#[derive(Debug, Clone)]
pub struct Served {
    /// Subject of the server certificate.
    pub subject: String,
    /// Its expiry, Unix seconds.
    pub not_after: i64,
}

impl Served {
    /// The expiry as RFC 3339, for the log.
    pub fn expiry(&self) -> String {
        crate::clock::rfc3339_nanos(self.not_after.saturating_mul(1_000_000_000))
    }
}

/// The server's TLS state; cheap to clone.
#[derive(Clone)]
pub struct Tls {
    files: Arc<TlsFiles>,
    current: Arc<RwLock<Arc<ServerConfig>>>,
    /// Offer `http/1.1` besides `h2` (the web listener: browsers open WebSockets over
    /// HTTP/1.1).
    web: bool,
}

impl Tls {
    /// Loads and checks `files`.
    pub fn load(files: TlsFiles) -> Result<(Tls, Served), TlsError> {
        let (config, served) = build(&files)?;
        let tls = Tls {
            files: Arc::new(files),
            current: Arc::new(RwLock::new(config)),
            web: false,
        };
        Ok((tls, served))
    }

    /// Re-reads the files; on any problem the config in service stays as it was.
    pub fn reload(&self) -> Result<Served, TlsError> {
        let (config, served) = build(&self.files)?;
        match self.current.write() {
            Ok(mut current) => *current = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
        Ok(served)
    }

    /// An acceptor with the config in service now.
    pub fn acceptor(&self) -> TlsAcceptor {
        let config = match self.current.read() {
            Ok(current) => Arc::clone(&current),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        };
        if self.web {
            let mut config = (*config).clone();
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            return TlsAcceptor::from(Arc::new(config));
        }
        TlsAcceptor::from(config)
    }

    /// The same certificates (reloads included), offering HTTP/1.1 too.
    pub fn for_web(&self) -> Tls {
        Tls {
            web: true,
            ..self.clone()
        }
    }

    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }
}

fn build(files: &TlsFiles) -> Result<(Arc<ServerConfig>, Served), TlsError> {
    let certs = read_certs(&files.cert)?;
    let leaf = certs.first().ok_or_else(|| TlsError::File {
        path: files.cert.clone(),
        problem: "no certificate in the file".into(),
    })?;
    let (subject, not_after) = check_validity(leaf).map_err(|problem| TlsError::File {
        path: files.cert.clone(),
        problem,
    })?;
    let key = read_key(&files.key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::File {
            path: files.cert.clone(),
            problem: e.to_string(),
        })?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for ca in read_certs(path)? {
                check_validity(&ca).map_err(|problem| TlsError::ClientCa {
                    path: path.clone(),
                    problem,
                })?;
                roots.add(ca).map_err(|e| TlsError::ClientCa {
                    path: path.clone(),
                    problem: e.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::ClientCa {
                    path: path.clone(),
                    problem: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Mismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
            problem: e.to_string(),
        })?;
    // gRPC runs over HTTP/2 only; tonic clients insist on it being negotiated.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok((Arc::new(config), Served { subject, not_after }))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        path: path.to_path_buf(),
        problem: format!("cannot read: {e}"),
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::File {
            path: path.to_path_buf(),
            problem: format!("not a PEM certificate file: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::File {
            path: path.to_path_buf(),
            problem: "no PEM certificate (BEGIN CERTIFICATE) in the file".into(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::File {
        path: path.to_path_buf(),
        problem: match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "no PEM private key (PKCS#8, PKCS#1 or SEC1) in the file".into()
            }
            e => format!("not a PEM private key: {e}"),
        },
    })
}

/// The certificate's subject and expiry, or why it is not valid now.
fn check_validity(der: &CertificateDer<'_>) -> Result<(String, i64), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not a valid X.509 certificate: {e}"))?;
    let validity = cert.validity();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let subject = cert.subject().to_string();
    if validity.not_after.timestamp() < now {
        return Err(format!(
            "certificate {subject:?} expired on {}",
            validity.not_after
        ));
    }
    if validity.not_before.timestamp() > now {
        return Err(format!(
            "certificate {subject:?} is not valid until {}",
            validity.not_before
        ));
    }
    Ok((subject, validity.not_after.timestamp()))
}

/// The subject of a verified client certificate, e.g. `CN=alice`: the caller's
/// identity under mTLS when no token is given.
pub fn client_subject(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.subject().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::devcerts::{DevCa, Validity, LOCAL_NAMES};

    fn files(dir: &Path, cert: &str, key: &str) -> TlsFiles {
        std::fs::write(dir.join("cert.pem"), cert).unwrap();
        std::fs::write(dir.join("key.pem"), key).unwrap();
        TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            client_ca: None,
        }
    }

    fn refusal(files: TlsFiles) -> String {
        match Tls::load(files) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn bad_files_are_refused_with_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::new("ca", Validity::days(1)).unwrap();
        let good = ca.server(&LOCAL_NAMES, Validity::days(1)).unwrap();
        let other = ca.server(&LOCAL_NAMES, Validity::days(1)).unwrap();
        let expired = ca.server(&LOCAL_NAMES, Validity::expired()).unwrap();

        let ok = files(dir.path(), &good.cert, &good.key);
        let (tls, served) = Tls::load(ok.clone()).unwrap();
        assert_eq!(served.subject, "CN=localhost");
        assert!(!tls.mutual());

        let missing = TlsFiles {
            cert: dir.path().join("nope.pem"),
            ..ok.clone()
        };
        let msg = refusal(missing);
        assert!(
            msg.contains("nope.pem") && msg.contains("cannot read"),
            "{msg}"
        );

        let msg = refusal(files(dir.path(), &good.cert, &other.key));
        assert!(msg.contains("do not match"), "{msg}");

        let msg = refusal(files(dir.path(), &expired.cert, &expired.key));
        assert!(msg.contains("cert.pem") && msg.contains("expired"), "{msg}");

        let msg = refusal(files(dir.path(), "hello", &good.key));
        assert!(msg.contains("no PEM certificate"), "{msg}");

        let msg = refusal(files(dir.path(), &good.cert, &good.cert));
        assert!(
            msg.contains("key.pem") && msg.contains("no PEM private key"),
            "{msg}"
        );
    }

    #[test]
    fn a_failed_reload_keeps_the_config_in_service() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::new("ca", Validity::days(1)).unwrap();
        let good = ca.server(&LOCAL_NAMES, Validity::days(1)).unwrap();
        let (tls, _) = Tls::load(files(dir.path(), &good.cert, &good.key)).unwrap();
        let before = Arc::as_ptr(&tls.current.read().unwrap());
        std::fs::write(dir.path().join("key.pem"), "garbage").unwrap();
        assert!(tls.reload().is_err());
        assert_eq!(Arc::as_ptr(&tls.current.read().unwrap()), before);
        std::fs::write(dir.path().join("key.pem"), &good.key).unwrap();
        tls.reload().unwrap();
        assert_ne!(Arc::as_ptr(&tls.current.read().unwrap()), before);
    }
}
