//! Broker URLs (`amqp.url`), read one way by the settings' checks (`config`), the
//! connections (`security::tls`) and the client tools: plain functions over strings that
//! import nothing of the crate, so that `config` needs nothing from `tls` and `tls`
//! nothing from `client` (the dependency goes one way: client -> tls -> config).

use elasticsearch::http::Url;
use lapin::uri::{AMQPUri, SASLMechanism};

/// `url` parsed as lapin does, except that an IP address stays the host: the URL parser
/// lapin uses keeps only domain names and puts `localhost` in place of an address, which
/// would connect elsewhere and verify the certificate for another name.
pub fn parse(url: &str) -> Result<AMQPUri, String> {
    if !url.starts_with("amqp://") && !url.starts_with("amqps://") {
        return Err("must be amqp:// or amqps:// URLs".into());
    }
    let mut uri: AMQPUri = url
        .parse()
        .map_err(|e| format!("is not a valid AMQP URL: {e}"))?;
    let parsed = Url::parse(url).map_err(|e| format!("is not a valid AMQP URL: {e}"))?;
    if parsed.domain().is_none()
        && let Some(address) = parsed.host_str()
    {
        uri.authority.host = address.trim_start_matches('[').trim_end_matches(']').into();
    }
    Ok(uri)
}

/// Whether `url` asks for certificate login (`?auth_mechanism=external`).
pub fn external_login(url: &str) -> bool {
    parse(url).is_ok_and(|uri| uri.query.auth_mechanism == Some(SASLMechanism::External))
}

/// The user name of an `amqp://user:password@host/vhost` URL (guest when it has none,
/// as RabbitMQ's clients default to).
pub fn user(url: &str) -> Option<String> {
    let uri: AMQPUri = url.parse().ok()?;
    Some(uri.authority.userinfo.username)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ip_address_stays_the_host() {
        let uri = parse("amqps://u:p@127.0.0.1:5671/%2f").unwrap();
        assert_eq!(uri.authority.host, "127.0.0.1");
        assert_eq!(uri.authority.port, 5671);
        assert_eq!(uri.vhost, "/");
        assert_eq!(parse("amqp://[::1]:5672").unwrap().authority.host, "::1");
        assert_eq!(
            parse("amqps://broker.example:5671").unwrap().authority.host,
            "broker.example"
        );
    }

    #[test]
    fn certificate_login_is_read_from_the_url() {
        assert!(external_login(
            "amqps://broker:5671/%2f?auth_mechanism=external"
        ));
        assert!(!external_login("amqps://u:p@broker:5671/%2f"));
        assert!(parse("amqps://broker?auth_mechanism=nope").is_err());
    }

    #[test]
    fn url_errors_never_repeat_the_url() {
        let err = parse("amqp://user:secret@host:notaport/").unwrap_err();
        assert!(!err.contains("secret"), "{err}");
        let err = parse("amqp:user:secret@host").unwrap_err();
        assert!(!err.contains("secret"), "{err}");
    }
}
