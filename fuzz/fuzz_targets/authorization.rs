//! `Authorization` header parsing: any bytes, as one header or several (split at
//! `\n`), never panic, and a Basic result never carries an empty or control-byte
//! user or password (so `pw\0junk` can never be checked as `pw`).
#![no_main]

use http::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use registry_gate::auth::{Credentials, parse_authorization};

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    for part in data.split(|&b| b == b'\n') {
        // Only what hyper would hand over: a valid header value.
        if let Ok(v) = HeaderValue::from_bytes(part) {
            headers.append(AUTHORIZATION, v);
        }
    }
    let count = headers.get_all(AUTHORIZATION).iter().count();
    match parse_authorization(&headers) {
        Ok(Credentials::Basic { user, password }) => {
            assert_eq!(count, 1);
            let control = |b: &u8| *b < 0x20 || *b == 0x7f;
            assert!(!user.is_empty() && !password.is_empty());
            assert!(!user.bytes().any(|b| control(&b)));
            assert!(!password.iter().any(control));
        }
        Ok(Credentials::Bearer(token)) => {
            assert_eq!(count, 1);
            assert!(!token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic()));
        }
        Ok(Credentials::None) => assert!(count <= 1),
        Err(_) => {}
    }
});
