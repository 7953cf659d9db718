//! `ticker token` and `ticker certs`: development credentials for the README
//! quickstart and local testing: an HS256 token minted with the server's secret
//! file, and a CA with server and client certificates (rcgen, via `devcerts`).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Args;

use super::connect::{exit, CliError};
use crate::{
    auth::{self, jwt::read_secret, MintClaims},
    transport::devcerts::{DevCa, Validity, LOCAL_NAMES},
};

#[derive(Args, Debug, Clone)]
pub struct TokenArgs {
    /// The server's HS256 secret file (its --jwt-secret-file).
    #[arg(long)]
    pub secret_file: PathBuf,
    /// Subject: who the token names.
    #[arg(long)]
    pub sub: String,
    /// Entitlements, space separated: exact symbols, prefixes ending in `*`, or `*`.
    #[arg(long, default_value = "")]
    pub symbols: String,
    /// Lifetime, e.g. 15m, 1h, 7d.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// Space-separated scopes; `publish` allows the Publish RPC.
    #[arg(long)]
    pub scope: Option<String>,
    /// `iss` claim (match the server's --jwt-issuer).
    #[arg(long)]
    pub issuer: Option<String>,
    /// `aud` claim (match the server's --jwt-audience).
    #[arg(long)]
    pub audience: Option<String>,
}

/// Prints a signed token on stdout.
pub fn token(args: TokenArgs) -> Result<(), CliError> {
    let secret =
        read_secret(&args.secret_file).map_err(|e| CliError::new(exit::LOCAL, e.to_string()))?;
    let claims = MintClaims {
        sub: args.sub,
        symbols: args.symbols.split_whitespace().map(String::from).collect(),
        scope: args.scope,
        ttl: args.ttl,
        issuer: args.issuer,
        audience: args.audience,
    };
    let token = auth::mint(&secret, &claims)
        .map_err(|e| CliError::new(exit::LOCAL, format!("cannot sign the token: {e}")))?;
    println!("{token}");
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct CertsArgs {
    /// Directory for the PEM files (created if missing).
    #[arg(long, default_value = "certs/dev")]
    pub out: PathBuf,
    /// Name of the client certificate (its subject is CN=<name>); written to
    /// <name>.pem and <name>.key.
    #[arg(long, default_value = "client")]
    pub client: String,
    /// Extra DNS names or IP addresses for the server certificate, besides
    /// localhost, 127.0.0.1 and ::1.
    #[arg(long = "san")]
    pub sans: Vec<String>,
    /// Validity of new certificates, in days.
    #[arg(long, default_value_t = 90)]
    pub days: i64,
    /// Replace existing server and client files (an existing CA is always kept).
    #[arg(long)]
    pub force: bool,
}

/// Writes (or reuses) ca.pem/ca.key, then server.pem/server.key and the client pair.
pub fn certs(args: CertsArgs) -> Result<(), CliError> {
    let local = |e: String| CliError::new(exit::LOCAL, e);
    std::fs::create_dir_all(&args.out)
        .map_err(|e| local(format!("cannot create {}: {e}", args.out.display())))?;
    let path = |name: &str| args.out.join(name);
    let validity = Validity::days(args.days.max(1));
    let ca = if path("ca.pem").exists() && path("ca.key").exists() {
        let cert = read(&path("ca.pem"))?;
        let key = read(&path("ca.key"))?;
        eprintln!("using the existing CA in {}", args.out.display());
        DevCa::from_pem(&cert, &key)
            .map_err(|e| local(format!("cannot use the CA in {}: {e}", args.out.display())))?
    } else {
        let ca =
            DevCa::new("tickerd development CA", validity).map_err(|e| local(e.to_string()))?;
        write(&path("ca.pem"), &ca.pem().cert, false)?;
        write(&path("ca.key"), &ca.pem().key, true)?;
        ca
    };
    if args.force || !path("server.pem").exists() {
        let mut names: Vec<&str> = LOCAL_NAMES.to_vec();
        names.extend(args.sans.iter().map(String::as_str));
        let server = ca
            .server(&names, validity)
            .map_err(|e| local(e.to_string()))?;
        write(&path("server.pem"), &server.cert, false)?;
        write(&path("server.key"), &server.key, true)?;
    } else {
        eprintln!("keeping the existing server.pem (use --force to replace it)");
    }
    let (cert, key) = (
        format!("{}.pem", args.client),
        format!("{}.key", args.client),
    );
    if args.force || !path(&cert).exists() {
        let client = ca
            .client(&args.client, validity)
            .map_err(|e| local(e.to_string()))?;
        write(&path(&cert), &client.cert, false)?;
        write(&path(&key), &client.key, true)?;
    } else {
        eprintln!("keeping the existing {cert} (use --force to replace it)");
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, CliError> {
    std::fs::read_to_string(path)
        .map_err(|e| CliError::new(exit::LOCAL, format!("cannot read {}: {e}", path.display())))
}

/// Writes `contents`; private keys are readable by the owner only.
fn write(path: &Path, contents: &str, private: bool) -> Result<(), CliError> {
    let fail = |e: std::io::Error| {
        CliError::new(exit::LOCAL, format!("cannot write {}: {e}", path.display()))
    };
    std::fs::write(path, contents).map_err(fail)?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
    }
    #[cfg(not(unix))]
    let _ = private;
    eprintln!("wrote {}", path.display());
    Ok(())
}
