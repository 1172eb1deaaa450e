//! PROXY protocol header parser: never panics, and what it accepts is
//! consistent (the header's own bytes parse to the same header; a prefix of
//! them is incomplete; "incomplete" only below the size bound).
#![no_main]

use libfuzzer_sys::fuzz_target;
use splice_proxy::edge::proxy_protocol::{MAX_V2_HEADER, Parsed, parse};

fuzz_target!(|data: &[u8]| {
    for accept_v1 in [false, true] {
        match parse(data, accept_v1) {
            Ok(Parsed::Header(header)) => {
                assert!(header.len <= data.len());
                let own = &data[..header.len];
                assert_eq!(parse(own, accept_v1), Ok(Parsed::Header(header.clone())));
                assert_eq!(parse(&own[..own.len() - 1], accept_v1), Ok(Parsed::Incomplete));
            }
            Ok(Parsed::Incomplete) => assert!(data.len() < MAX_V2_HEADER),
            Ok(Parsed::NotAHeader) | Err(_) => {}
        }
    }
});
