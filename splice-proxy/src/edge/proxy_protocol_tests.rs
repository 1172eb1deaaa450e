//! Headers are built with `ppp`'s builder (or by hand where it would refuse),
//! so the parser is checked against an independent writer.

use ppp::v2::{Builder, IPv4, IPv6, Protocol};

use super::*;

const VPCE: &str = "vpce-0123456789abcdef0";

fn vpce_tlv(id: &str) -> Vec<u8> {
    [&[AWS_SUBTYPE_VPCE_ID][..], id.as_bytes()].concat()
}

fn v4_header(tlvs: &[(u8, &[u8])]) -> Vec<u8> {
    let mut builder =
        Builder::with_addresses(0x21, Protocol::Stream, IPv4::new([192, 0, 2, 7], [10, 0, 0, 1], 40000, 443));
    for (kind, value) in tlvs {
        builder = builder.write_tlv(*kind, value).unwrap();
    }
    builder.build().unwrap()
}

fn header(buf: &[u8]) -> ProxyHeader {
    match parse(buf, false) {
        Ok(Parsed::Header(h)) => h,
        other => panic!("{buf:?}: {other:?}"),
    }
}

#[test]
fn crc32c_of_the_check_string() {
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
}

#[test]
fn ipv4_with_a_vpce_id_and_bytes_after_it() {
    let vpce = vpce_tlv(VPCE);
    let bytes = v4_header(&[(TLV_AWS, &vpce)]);
    let with_hello = [bytes.as_slice(), &[0x16, 0x03, 0x01]].concat();
    let h = header(&with_hello);
    assert_eq!(h.len, bytes.len());
    assert_eq!(h.command, Command::Proxy);
    assert_eq!(h.source, Some("192.0.2.7:40000".parse().unwrap()));
    assert_eq!(h.vpce_id.as_deref(), Some(VPCE));
}

#[test]
fn ipv6_without_tlvs() {
    let source: std::net::Ipv6Addr = "2001:db8::7".parse().unwrap();
    let bytes = Builder::with_addresses(
        0x21,
        Protocol::Stream,
        IPv6::new(source, "2001:db8::1".parse().unwrap(), 50000, 443),
    )
    .build()
    .unwrap();
    let h = header(&bytes);
    assert_eq!(h.source, Some(SocketAddr::new(source.into(), 50000)));
    assert_eq!(h.vpce_id, None);
}

#[test]
fn local_headers_are_accepted_whatever_their_block() {
    let unspec = Builder::new(0x20, 0x00).build().unwrap();
    assert_eq!(
        header(&unspec),
        ProxyHeader { version: 2, command: Command::Local, source: None, vpce_id: None, len: 16 }
    );
    // AF_INET with no address bytes: discarded, as the specification says.
    let mut short = V2_SIGNATURE.to_vec();
    short.extend([0x20, 0x11, 0, 0]);
    assert_eq!(header(&short).command, Command::Local);
}

#[test]
fn every_prefix_of_a_header_is_incomplete() {
    let vpce = vpce_tlv(VPCE);
    let bytes = v4_header(&[(TLV_AWS, &vpce)]);
    for n in 0..bytes.len() {
        assert_eq!(parse(&bytes[..n], true), Ok(Parsed::Incomplete), "{n} bytes");
    }
}

#[test]
fn an_oversized_length_is_refused_before_the_bytes_arrive() {
    let mut bytes = V2_SIGNATURE.to_vec();
    bytes.extend([0x21, 0x11, 0x07, 0xd0]);
    assert_eq!(parse(&bytes, false), Err(HeaderError::Oversized { declared: 2016, limit: MAX_V2_HEADER }));
}

#[test]
fn bad_fixed_fields_are_invalid() {
    for (byte12, byte13) in [(0x11, 0x11), (0x22, 0x11), (0x21, 0x41), (0x21, 0x13), (0x21, 0x12)] {
        let mut bytes = V2_SIGNATURE.to_vec();
        bytes.extend([byte12, byte13, 0, 12]);
        bytes.extend([0; 12]);
        assert!(
            matches!(parse(&bytes, false), Err(HeaderError::InvalidV2(_))),
            "{byte12:#x} {byte13:#x}: {:?}",
            parse(&bytes, false)
        );
    }
}

#[test]
fn a_length_too_short_for_the_family_is_invalid() {
    let mut bytes = V2_SIGNATURE.to_vec();
    bytes.extend([0x21, 0x11, 0, 4, 1, 2, 3, 4]);
    assert!(matches!(parse(&bytes, false), Err(HeaderError::InvalidV2(_))));
}

#[test]
fn tlv_forms() {
    let ssl = [&[0x07, 0, 0, 0, 0][..], &[0x21, 0, 3], b"1.3"].concat();
    type Tlvs = Vec<(u8, Vec<u8>)>;
    let cases: Vec<(&str, Tlvs, bool)> = vec![
        ("alpn", vec![(0x01, b"h2".to_vec())], true),
        ("authority", vec![(0x02, b"api.example.com".to_vec())], true),
        ("noop", vec![(0x04, vec![0; 7])], true),
        ("unique id", vec![(0x05, vec![9; 128])], true),
        ("unique id too long", vec![(0x05, vec![9; 129])], false),
        ("ssl with a version", vec![(0x20, ssl.clone())], true),
        ("ssl too short", vec![(0x20, vec![0; 4])], false),
        ("ssl with a broken sub-TLV", vec![(0x20, [&ssl[..5], &[0x21, 0, 9, b'x']].concat())], false),
        ("netns", vec![(0x30, b"blue".to_vec())], true),
        ("unknown type", vec![(0xE0, vec![1, 2, 3])], true),
        ("aws other subtype", vec![(TLV_AWS, vec![0x02, 1])], true),
        ("aws empty", vec![(TLV_AWS, vec![])], false),
        ("two vpce ids", vec![(TLV_AWS, vpce_tlv(VPCE)), (TLV_AWS, vpce_tlv(VPCE))], false),
        ("vpce id not text", vec![(TLV_AWS, vec![0x01, 0xff, 0x00])], false),
        ("crc32c wrong length", vec![(0x03, vec![0; 3])], false),
    ];
    for (name, tlvs, valid) in cases {
        let tlvs: Vec<(u8, &[u8])> = tlvs.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        let result = parse(&v4_header(&tlvs), false);
        assert_eq!(matches!(result, Ok(Parsed::Header(_))), valid, "{name}: {result:?}");
    }
}

#[test]
fn a_tlv_running_past_the_header_is_invalid() {
    let mut bytes = v4_header(&[]);
    bytes[15] += 4;
    bytes.extend([0x04, 0, 9, 0]);
    assert!(matches!(parse(&bytes, false), Err(HeaderError::InvalidV2(_))), "{:?}", parse(&bytes, false));
}

#[test]
fn crc32c_is_checked() {
    let bytes = v4_header(&[(0x03, &[0; 4])]);
    let at = bytes.len() - 4;
    let mut good = bytes.clone();
    good[at..].copy_from_slice(&crc32c(&bytes).to_be_bytes());
    assert!(matches!(parse(&good, false), Ok(Parsed::Header(_))));
    let mut bad = good;
    bad[at] ^= 1;
    assert!(matches!(parse(&bad, false), Err(HeaderError::InvalidV2(m)) if m.contains("CRC32C")));
}

#[test]
fn datagram_transport_is_invalid_for_tcp() {
    let bytes =
        Builder::with_addresses(0x21, Protocol::Datagram, IPv4::new([192, 0, 2, 7], [10, 0, 0, 1], 1, 2))
            .build()
            .unwrap();
    assert!(matches!(parse(&bytes, false), Err(HeaderError::InvalidV2(_))));
}

#[test]
fn other_first_bytes_are_not_a_header() {
    assert_eq!(parse(&[0x16, 0x03, 0x01, 0x02, 0x00], true), Ok(Parsed::NotAHeader));
    assert_eq!(parse(b"\r\n\r\n\0\r\nQUIX\n\x21\x11\0\x0c", false), Ok(Parsed::NotAHeader));
    assert_eq!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", false), Ok(Parsed::NotAHeader));
    assert_eq!(parse(b"GET / HTTP/1.1\r\n", true), Ok(Parsed::NotAHeader));
}

#[test]
fn v1_lines() {
    let tcp4 = b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 443\r\n";
    let with_data = [&tcp4[..], b"\x16\x03"].concat();
    let h = match parse(&with_data, true) {
        Ok(Parsed::Header(h)) => h,
        other => panic!("{other:?}"),
    };
    assert_eq!((h.version, h.len, h.source), (1, tcp4.len(), Some("192.0.2.7:40000".parse().unwrap())));
    for n in 0..tcp4.len() {
        assert_eq!(parse(&tcp4[..n], true), Ok(Parsed::Incomplete), "{n} bytes");
    }
    let tcp6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 50000 443\r\n";
    assert!(matches!(parse(tcp6, true), Ok(Parsed::Header(h)) if h.source.is_some_and(|s| s.is_ipv6())));
    assert!(matches!(parse(b"PROXY UNKNOWN\r\n", true), Ok(Parsed::Header(h)) if h.source.is_none()));
}

#[test]
fn bad_v1_lines() {
    let long = [&b"PROXY TCP4 "[..], &[b'1'; 120]].concat();
    assert!(matches!(parse(&long, true), Err(HeaderError::Oversized { .. })));
    for line in [
        &b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 443\rX"[..],
        b"PROXY TCP4 192.0.2.300 10.0.0.1 40000 443\r\n",
        b"PROXY TCP4 192.0.2.7 10.0.0.1 40000\r\n",
        b"PROXY TCP5 192.0.2.7 10.0.0.1 40000 443\r\n",
        b"PROXY TCP4 192.0.2.7 10.0.0.1 040000 443\r\n",
    ] {
        assert!(
            matches!(parse(line, true), Err(HeaderError::InvalidV1(_))),
            "{line:?}: {:?}",
            parse(line, true)
        );
    }
}
