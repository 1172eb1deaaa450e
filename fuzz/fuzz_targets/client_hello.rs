//! ClientHello parser: never panics, accepts only what its own records hold,
//! and says "incomplete" only below the size bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use splice_proxy::edge::client_hello::{HelloError, MAX_PEEK, parse};

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Ok(hello) => {
            assert!(hello.len <= data.len());
            assert_eq!(parse(&data[..hello.len]), Ok(hello.clone()));
            assert_eq!(parse(&data[..hello.len - 1]), Err(HelloError::Incomplete));
        }
        Err(HelloError::Incomplete) => assert!(data.len() < MAX_PEEK),
        Err(_) => {}
    }
});
