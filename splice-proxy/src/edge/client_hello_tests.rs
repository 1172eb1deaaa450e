use std::sync::Arc;

use super::*;

/// A ClientHello message (handshake header included) with these extensions.
fn message(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut body = vec![0x03, 0x03];
    body.extend([7; 32]); // random
    body.push(0); // session id
    body.extend([0, 2, 0x13, 0x01]); // one cipher suite
    body.extend([1, 0]); // null compression
    let mut ext = Vec::new();
    for (kind, data) in extensions {
        ext.extend(kind.to_be_bytes());
        ext.extend(u16::try_from(data.len()).unwrap().to_be_bytes());
        ext.extend(data);
    }
    body.extend(u16::try_from(ext.len()).unwrap().to_be_bytes());
    body.extend(ext);
    let len = u32::try_from(body.len()).unwrap().to_be_bytes();
    [&[HANDSHAKE_CLIENT_HELLO, len[1], len[2], len[3]][..], &body].concat()
}

fn sni(name: &str) -> (u16, Vec<u8>) {
    let n = u16::try_from(name.len()).unwrap();
    let mut data = (n + 3).to_be_bytes().to_vec();
    data.push(0);
    data.extend(n.to_be_bytes());
    data.extend(name.as_bytes());
    (0, data)
}

/// `message` in records of at most `max` bytes each.
fn records(message: &[u8], max: usize) -> Vec<u8> {
    message
        .chunks(max)
        .flat_map(|chunk| {
            let len = u16::try_from(chunk.len()).unwrap().to_be_bytes();
            [&[CONTENT_HANDSHAKE, 3, 1, len[0], len[1]][..], chunk].concat()
        })
        .collect()
}

/// What rustls sends first for `name`.
fn rustls_hello(name: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

#[test]
fn a_real_client_hello_with_and_without_sni() {
    let bytes = rustls_hello("API.Example.com");
    assert_eq!(
        parse(&bytes),
        Ok(ClientHello { server_name: Some("api.example.com".into()), len: bytes.len() })
    );
    // rustls sends no server_name for an IP address.
    assert_eq!(parse(&rustls_hello("10.0.0.1")).unwrap().server_name, None);
}

#[test]
fn every_prefix_is_incomplete() {
    let bytes = rustls_hello("api.example.com");
    for n in 0..bytes.len() {
        assert_eq!(parse(&bytes[..n]), Err(HelloError::Incomplete), "{n} bytes");
    }
}

#[test]
fn a_hello_split_over_records_is_reassembled() {
    let message = message(&[sni("a.example.com"), (10, vec![0, 2, 0, 29])]);
    for max in [1, 7, 50, message.len()] {
        let bytes = [records(&message, max), b"after".to_vec()].concat();
        let hello = parse(&bytes).unwrap_or_else(|e| panic!("records of {max}: {e}"));
        assert_eq!(hello.server_name.as_deref(), Some("a.example.com"));
        assert_eq!(hello.len, bytes.len() - 5);
    }
}

#[test]
fn not_tls() {
    for bytes in [&b"GET / HTTP/1.1\r\n"[..], b"\x16\x02", b"\x17\x03\x03\x00\x10", b"\x80\x2e\x01"] {
        assert!(matches!(parse(bytes), Err(HelloError::NotTls(_))), "{bytes:?}: {:?}", parse(bytes));
    }
}

#[test]
fn invalid_hellos() {
    let good = message(&[sni("a.example.com")]);
    let mut trailing = good.clone();
    trailing[3] += 2;
    trailing.extend([0, 0]);
    let mut server_hello = good.clone();
    server_hello[0] = 2;
    let mut two_entries = sni("a.example.com");
    two_entries.1[1] += 6;
    two_entries.1.extend([0, 0, 3, b'b', b'.', b'c']);
    let cases = [
        ("bytes after the extensions", records(&trailing, 1000)),
        ("server hello", records(&server_hello, 1000)),
        ("sni twice", records(&message(&[sni("a.com"), sni("b.com")]), 1000)),
        ("two names", records(&message(&[two_entries]), 1000)),
        ("name with a trailing dot", records(&message(&[sni("a.com.")]), 1000)),
        ("name with a space", records(&message(&[sni("a b.com")]), 1000)),
        ("empty server_name", records(&message(&[(0, vec![])]), 1000)),
        ("alert inside", [records(&good[..10], 10), vec![0x15, 3, 3, 0, 2, 2, 40]].concat()),
        ("two messages", records(&[good.clone(), good.clone()].concat(), 10_000)),
    ];
    for (name, bytes) in cases {
        assert!(matches!(parse(&bytes), Err(HelloError::Invalid(_))), "{name}: {:?}", parse(&bytes));
    }
}

#[test]
fn size_bounds() {
    let mut huge = vec![HANDSHAKE_CLIENT_HELLO, 0, 0x50, 0];
    huge.extend([0; 100]);
    assert!(matches!(parse(&records(&huge, 1000)), Err(HelloError::TooLarge { .. })));
    // Many tiny records: the peek bound holds before the message bound.
    let tiny = records(&message(&[(21, vec![0; 4000])]), 1);
    assert!(matches!(parse(&tiny), Err(HelloError::TooLarge { .. })));
}

#[test]
fn no_extensions_at_all() {
    let mut bare = message(&[]);
    bare.truncate(bare.len() - 2);
    bare[3] -= 2;
    assert_eq!(parse(&records(&bare, 1000)).unwrap().server_name, None);
}
