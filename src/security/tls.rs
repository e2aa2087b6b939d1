//! TLS for the broker (`amqps://`) and the engine (`https://`): CA bundles, client
//! certificates and their keys, read from PEM files.
//!
//! Peer certificates are always verified, chain and host name, against the system's CAs
//! plus the configured CA bundle (native-tls adds to the system's store); no setting
//! turns verification off. A file that can't be read or parsed is a configuration error
//! naming its key: the binary reads every file before it starts (`check`, exit code 2);
//! the broker's files are read again at each connection, so renewed certificates are
//! picked up when the worker reconnects; the engine's when the worker starts. Key
//! contents never appear in errors, logs or `Debug` output.

use std::fmt;

use elasticsearch::cert::Certificate;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{Connection, ConnectionProperties};
use openssl::pkcs12::Pkcs12;
use openssl::pkey::{PKey, Private};
use openssl::stack::Stack;
use openssl::x509::X509;

use crate::amqp_url;
use crate::config::{AmqpSettings, ConfigError, Settings, StorageSettings};

/// Reads every TLS file the settings name, as the worker will: the first one that can't
/// be used is an error naming its key.
pub fn check(settings: &Settings) -> Result<(), ConfigError> {
    AmqpTls::load(&settings.amqp)?;
    StorageTls::load(&settings.storage)?;
    Ok(())
}

/// What broker connections present and trust.
#[derive(Clone, Default)]
pub struct AmqpTls {
    config: OwnedTLSConfig,
}

impl fmt::Debug for AmqpTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpTls")
            .field("ca", &self.config.cert_chain.is_some())
            .field("client_certificate", &self.config.identity.is_some())
            .finish()
    }
}

impl AmqpTls {
    /// `amqp.tls_ca_file`, `amqp.tls_cert_file` and `amqp.tls_key_file`.
    pub fn load(settings: &AmqpSettings) -> Result<Self, ConfigError> {
        let cert_chain = match settings.tls_ca_file.as_str() {
            "" => None,
            path => Some(to_pem(&certificates("amqp.tls_ca_file", path)?)),
        };
        let identity = Identity::load(
            ("amqp.tls_cert_file", &settings.tls_cert_file),
            ("amqp.tls_key_file", &settings.tls_key_file),
        )?
        .map(|id| {
            let key = id
                .key
                .private_key_to_pem_pkcs8()
                .map_err(|_| invalid("amqp.tls_key_file", "cannot be converted to PKCS#8"))?;
            Ok::<_, ConfigError>(OwnedIdentity::PKCS8 {
                pem: to_pem(&id.chain).into_bytes(),
                key,
            })
        })
        .transpose()?;
        Ok(AmqpTls {
            config: OwnedTLSConfig {
                identity,
                cert_chain,
            },
        })
    }
}

/// Connects to the broker at `url` (`amqp://` or `amqps://`; `amqps://` verifies the
/// broker's certificate for the URL's host, and never falls back to plain text).
pub async fn connect(
    url: &str,
    tls: &AmqpTls,
    properties: ConnectionProperties,
) -> Result<Connection, lapin::Error> {
    let uri = amqp_url::parse(url).map_err(|e| io_error(format!("amqp.url: {e}")))?;
    let secure = uri.scheme == lapin::uri::AMQPScheme::AMQPS;
    let (host, port) = (uri.authority.host.clone(), uri.authority.port);
    let connected = lapin::DefaultConnectionBuilder::new()?
        .with_uri(uri)
        .with_properties(properties)
        .with_tls_config(tls.config.clone())
        .connect()
        .await;
    connected.map_err(|err| match err.kind() {
        // Say what failed: a handshake error's text alone ("certificate verify
        // failed", "unknown ca") doesn't name the broker.
        lapin::ErrorKind::IOError(cause) if secure => io_error(format!(
            "TLS connection to {host}:{port}: {}",
            chain(&**cause)
        )),
        _ => err,
    })
}

/// The broker user a client connected to `url` (one of `settings.urls()`) logs in as,
/// for the `user_id` it publishes (RabbitMQ refuses any other): the URL's user, or with
/// certificate login the client certificate's common name, which is the user under
/// RabbitMQ's `ssl_cert_login_from = common_name`.
pub fn login_user(settings: &AmqpSettings, url: &str) -> Option<String> {
    if !amqp_url::external_login(url) {
        return amqp_url::user(url);
    }
    let pem = std::fs::read(&settings.tls_cert_file).ok()?;
    let leaf = X509::stack_from_pem(&pem).ok()?.into_iter().next()?;
    let cn = leaf
        .subject_name()
        .entries_by_nid(openssl::nid::Nid::COMMONNAME)
        .next()?
        .data()
        .to_string()
        .ok()?;
    Some(cn)
}

/// What engine connections present and trust.
#[derive(Default)]
pub struct StorageTls {
    /// The CA bundle trusted besides the system's.
    pub ca: Option<Certificate>,
    /// The client certificate and key as a PKCS#12 archive (DER, empty password): the
    /// only form the engine client takes with native-tls.
    pub identity: Option<Vec<u8>>,
}

impl fmt::Debug for StorageTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorageTls")
            .field("ca", &self.ca.is_some())
            .field("client_certificate", &self.identity.is_some())
            .finish()
    }
}

impl StorageTls {
    /// `storage.tls_ca_file`, `storage.tls_cert_file` and `storage.tls_key_file`.
    pub fn load(settings: &StorageSettings) -> Result<Self, ConfigError> {
        const CA: &str = "storage.tls_ca_file";
        let ca = match settings.tls_ca_file.as_str() {
            "" => None,
            path => {
                let mut bundle: Option<Certificate> = None;
                for cert in certificates(CA, path)? {
                    let der = cert
                        .to_der()
                        .map_err(|_| invalid(CA, "holds an unusable certificate"))?;
                    let one = Certificate::from_der(&der)
                        .map_err(|_| invalid(CA, "holds an unusable certificate"))?;
                    match bundle.as_mut() {
                        Some(bundle) => bundle.append(one),
                        None => bundle = Some(one),
                    }
                }
                bundle
            }
        };
        let identity = Identity::load(
            ("storage.tls_cert_file", &settings.tls_cert_file),
            ("storage.tls_key_file", &settings.tls_key_file),
        )?
        .map(|id| {
            id.pkcs12()
                .map_err(|_| invalid("storage.tls_cert_file", "cannot be packed with its key"))
        })
        .transpose()?;
        Ok(StorageTls { ca, identity })
    }
}

/// A client certificate (leaf first, then its chain) and its private key.
struct Identity {
    chain: Vec<X509>,
    key: PKey<Private>,
}

impl Identity {
    /// Both files, or neither (`Settings::validate` refuses one alone).
    fn load(
        (cert_key, cert_path): (&'static str, &str),
        (key_key, key_path): (&'static str, &str),
    ) -> Result<Option<Self>, ConfigError> {
        if cert_path.is_empty() && key_path.is_empty() {
            return Ok(None);
        }
        if cert_path.is_empty() || key_path.is_empty() {
            let missing = if cert_path.is_empty() {
                cert_key
            } else {
                key_key
            };
            return Err(invalid(missing, "must be set with its pair"));
        }
        let chain = certificates(cert_key, cert_path)?;
        let key = private_key(key_key, key_path)?;
        let matches = chain[0]
            .public_key()
            .is_ok_and(|public| public.public_eq(&key));
        if !matches {
            return Err(invalid(
                key_key,
                &format!("{key_path:?} is not the key of {cert_key}'s certificate"),
            ));
        }
        Ok(Some(Identity { chain, key }))
    }

    fn pkcs12(&self) -> Result<Vec<u8>, openssl::error::ErrorStack> {
        let mut builder = Pkcs12::builder();
        builder
            .name("mupdate-worker")
            .pkey(&self.key)
            .cert(&self.chain[0]);
        if self.chain.len() > 1 {
            let mut ca = Stack::new()?;
            for cert in &self.chain[1..] {
                ca.push(cert.clone())?;
            }
            builder.ca(ca);
        }
        builder.build2("")?.to_der()
    }
}

fn invalid(key: &'static str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.to_owned(),
    }
}

fn read(key: &'static str, path: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| invalid(key, &format!("cannot read {path:?}: {e}")))
}

/// The PEM certificates of a file: at least one.
fn certificates(key: &'static str, path: &str) -> Result<Vec<X509>, ConfigError> {
    let pem = read(key, path)?;
    match X509::stack_from_pem(&pem) {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        Ok(_) => Err(invalid(key, &format!("{path:?} holds no PEM certificate"))),
        Err(e) => Err(invalid(
            key,
            &format!("{path:?} holds no valid PEM certificate ({e})"),
        )),
    }
}

/// The unencrypted PEM private key of a file. Its contents stay out of every message.
fn private_key(key: &'static str, path: &str) -> Result<PKey<Private>, ConfigError> {
    let pem = read(key, path)?;
    if pem.windows(9).any(|w| w == b"ENCRYPTED") {
        return Err(invalid(
            key,
            &format!(
                "{path:?} is encrypted: give the key unencrypted \
                 (openssl pkey -in KEY -out PLAIN), readable by the worker's user alone"
            ),
        ));
    }
    // An empty passphrase: OpenSSL never prompts on a terminal for one.
    PKey::private_key_from_pem_passphrase(&pem, b"").map_err(|_| {
        invalid(
            key,
            &format!("{path:?} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)"),
        )
    })
}

fn to_pem(certs: &[X509]) -> String {
    certs
        .iter()
        .filter_map(|c| c.to_pem().ok())
        .map(|pem| String::from_utf8_lossy(&pem).into_owned())
        .collect()
}

fn io_error(message: String) -> lapin::Error {
    std::io::Error::other(message).into()
}

/// An error and its sources, `: `-separated, without repeats.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_garbage_files_name_their_key() {
        let mut amqp = crate::config::Settings::defaults().amqp;
        amqp.tls_ca_file = "/nonexistent/ca.pem".into();
        let err = AmqpTls::load(&amqp).unwrap_err().to_string();
        assert!(
            err.contains("amqp.tls_ca_file") && err.contains("cannot read"),
            "{err}"
        );
        let dir = std::env::temp_dir().join(format!("mupdate-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let garbage = dir.join("garbage.pem");
        std::fs::write(&garbage, "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n").unwrap();
        amqp.tls_ca_file = String::new();
        amqp.tls_cert_file = garbage.to_string_lossy().into_owned();
        amqp.tls_key_file = garbage.to_string_lossy().into_owned();
        let err = AmqpTls::load(&amqp).unwrap_err().to_string();
        assert!(err.contains("amqp.tls_cert_file"), "{err}");
        let mut storage = crate::config::Settings::defaults().storage;
        storage.tls_ca_file = garbage.to_string_lossy().into_owned();
        let err = StorageTls::load(&storage).unwrap_err().to_string();
        assert!(err.contains("storage.tls_ca_file"), "{err}");
        assert!(!err.contains("c2VjcmV0"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
