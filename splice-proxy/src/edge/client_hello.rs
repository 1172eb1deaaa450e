//! The TLS ClientHello a connection starts with, and its server name (SNI).
//! Pure functions over peeked bytes; nothing here consumes them.
//!
//! `tls-parser` parses the ClientHello body and the server_name extension.
//! It is wrapped because its record parser cannot reassemble a ClientHello
//! split over several TLS records (allowed, and what a client with a large
//! hello does), cannot bound the size, and turns a truncated extension block
//! into "no extensions" rather than an error. So the records are walked and
//! reassembled here with a size bound, the extensions are walked one by one,
//! and `tls-parser` only sees complete, bounded slices.

use std::collections::HashSet;

use tls_parser::{
    SNIType, TlsExtension, parse_tls_extension_sni_content, parse_tls_extension_unknown,
    parse_tls_handshake_client_hello, parse_tls_record_header,
};

/// Largest ClientHello handshake message accepted (type, length and body).
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;
/// Most bytes looked at, record headers included (a hello split into many
/// small records costs 5 bytes a record).
pub const MAX_PEEK: usize = MAX_CLIENT_HELLO + 4 * 1024;
/// Largest TLS plaintext record (2^14 bytes).
const MAX_RECORD: usize = 16 * 1024;
const RECORD_HEADER: usize = 5;
const CONTENT_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
const EXTENSION_SERVER_NAME: u16 = 0;

/// A complete ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The host name asked for, lowercased; `None` when there is no server_name extension.
    pub server_name: Option<String>,
    /// Bytes the hello's records take (the peeked bytes the decision rests on).
    pub len: usize,
}

/// Why the first bytes are not an acceptable ClientHello, or not yet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("more bytes are needed")]
    Incomplete,
    #[error("not a TLS handshake: first bytes {0:02x?}")]
    NotTls(Vec<u8>),
    #[error("ClientHello larger than {limit} bytes ({declared})")]
    TooLarge { declared: usize, limit: usize },
    #[error("invalid ClientHello: {0}")]
    Invalid(String),
}

/// Parses the ClientHello at the start of `buf` (bytes after it are ignored).
pub fn parse(buf: &[u8]) -> Result<ClientHello, HelloError> {
    let (message, len) = reassemble(buf)?;
    let body = &message[4..];
    let (rest, hello) =
        parse_tls_handshake_client_hello(body).map_err(|e| invalid(format!("ClientHello body: {e:?}")))?;
    if !rest.is_empty() {
        return Err(invalid(format!("{} bytes after the extensions", rest.len())));
    }
    if hello.version.0 >> 8 != 3 {
        return Err(invalid(format!("version {:#06x}", hello.version.0)));
    }
    let server_name = match hello.ext {
        Some(extensions) => server_name(extensions)?,
        None => None,
    };
    Ok(ClientHello { server_name, len })
}

/// Walks the handshake records at the start of `buf` and returns the
/// ClientHello message (header included) and the bytes its records take.
fn reassemble(buf: &[u8]) -> Result<(Vec<u8>, usize), HelloError> {
    let mut message = Vec::new();
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        if rest.len() < RECORD_HEADER {
            check_partial_record_header(rest, at == 0)?;
            if at + RECORD_HEADER > MAX_PEEK {
                return Err(HelloError::TooLarge { declared: at + RECORD_HEADER, limit: MAX_PEEK });
            }
            return Err(HelloError::Incomplete);
        }
        let (_, header) =
            parse_tls_record_header(rest).map_err(|e| invalid(format!("record header: {e:?}")))?;
        if header.record_type.0 != CONTENT_HANDSHAKE || header.version.0 >> 8 != 3 {
            return Err(if at == 0 {
                HelloError::NotTls(rest[..RECORD_HEADER].to_vec())
            } else {
                invalid(format!("record {:02x?} inside the ClientHello", &rest[..RECORD_HEADER]))
            });
        }
        let record_len = usize::from(header.len);
        if record_len == 0 || record_len > MAX_RECORD {
            return Err(invalid(format!("handshake record of {record_len} bytes")));
        }
        let end = at + RECORD_HEADER + record_len;
        if end > MAX_PEEK {
            return Err(HelloError::TooLarge { declared: end, limit: MAX_PEEK });
        }
        let Some(fragment) = buf.get(at + RECORD_HEADER..end) else {
            // Check what has arrived of the message so far, so a bad hello
            // is refused without waiting for the rest of its record.
            let partial = [&message[..], &buf[at + RECORD_HEADER..]].concat();
            check_message_start(&partial)?;
            return Err(HelloError::Incomplete);
        };
        message.extend_from_slice(fragment);
        at = end;
        if let Some(total) = check_message_start(&message)? {
            if message.len() == total {
                return Ok((message, at));
            }
            if message.len() > total {
                return Err(invalid("another handshake message after the ClientHello".into()));
            }
        }
    }
}

/// The first bytes of a record header: a handshake record of version 3.x.
fn check_partial_record_header(rest: &[u8], first: bool) -> Result<(), HelloError> {
    let bad = rest.first().is_some_and(|&t| t != CONTENT_HANDSHAKE) || rest.get(1).is_some_and(|&v| v != 3);
    match (bad, first) {
        (false, _) => Ok(()),
        (true, true) => Err(HelloError::NotTls(rest.to_vec())),
        (true, false) => Err(invalid(format!("record {rest:02x?} inside the ClientHello"))),
    }
}

/// The handshake message's type and length, once its 4-byte header is there.
fn check_message_start(message: &[u8]) -> Result<Option<usize>, HelloError> {
    let Some(&[kind, a, b, c]) = message.get(..4).map(|h| <&[u8; 4]>::try_from(h).expect("4 bytes")) else {
        if message.first().is_some_and(|&kind| kind != HANDSHAKE_CLIENT_HELLO) {
            return Err(invalid(format!("handshake type {}, not ClientHello", message[0])));
        }
        return Ok(None);
    };
    if kind != HANDSHAKE_CLIENT_HELLO {
        return Err(invalid(format!("handshake type {kind}, not ClientHello")));
    }
    let total = 4 + (usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c));
    if total > MAX_CLIENT_HELLO {
        return Err(HelloError::TooLarge { declared: total, limit: MAX_CLIENT_HELLO });
    }
    Ok(Some(total))
}

/// The host name of the server_name extension, if there is one. Every
/// extension must be well formed and none may appear twice.
fn server_name(mut extensions: &[u8]) -> Result<Option<String>, HelloError> {
    let mut seen = HashSet::new();
    let mut name = None;
    while !extensions.is_empty() {
        let (rest, extension) =
            parse_tls_extension_unknown(extensions).map_err(|e| invalid(format!("extension: {e:?}")))?;
        extensions = rest;
        let TlsExtension::Unknown(kind, data) = extension else {
            return Err(invalid("unexpected extension form".into()));
        };
        if !seen.insert(kind.0) {
            return Err(invalid(format!("extension {} appears twice", kind.0)));
        }
        if kind.0 == EXTENSION_SERVER_NAME {
            name = Some(host_name(data)?);
        }
    }
    Ok(name)
}

/// RFC 6066: one entry of type host_name, an ASCII DNS name without a trailing dot.
fn host_name(data: &[u8]) -> Result<String, HelloError> {
    let (rest, extension) =
        parse_tls_extension_sni_content(data).map_err(|e| invalid(format!("server_name: {e:?}")))?;
    let TlsExtension::SNI(entries) = extension else {
        return Err(invalid("server_name extension of another form".into()));
    };
    let [(SNIType::HostName, name)] = entries.as_slice() else {
        return Err(invalid(format!("server_name with {} entries, not one host name", entries.len())));
    };
    // The list must hold exactly that entry (type, length, name): `tls-parser`
    // stops quietly at a malformed entry.
    let list_len = data.get(..2).map(|l| usize::from(u16::from_be_bytes([l[0], l[1]])));
    if !rest.is_empty() || data.len() != 2 + 3 + name.len() || list_len != Some(3 + name.len()) {
        return Err(invalid("server_name list holds more than its host name".into()));
    }
    let name = std::str::from_utf8(name)
        .ok()
        .filter(|n| crate::addr::is_dns_name(n) && !n.ends_with('.'))
        .ok_or_else(|| {
            invalid(format!("server name {:?} is not a DNS name", String::from_utf8_lossy(name)))
        })?;
    Ok(name.to_ascii_lowercase())
}

fn invalid(message: String) -> HelloError {
    HelloError::Invalid(message)
}

#[cfg(test)]
#[path = "client_hello_tests.rs"]
mod tests;
