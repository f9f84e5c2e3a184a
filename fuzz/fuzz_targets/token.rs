//! Registry tokens: any string given to `TokenKey::verify` is refused or accepted
//! without a panic; claims of any values, signed with the gate's key, go through
//! every check after the signature; scopes from `/token` queries parse and grant.
#![no_main]

use libfuzzer_sys::fuzz_target;
use registry_gate::auth::policy::Action;
use registry_gate::auth::token::{Claims, TokenKey, grant, parse_scopes, rfc3339};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let key = TokenKey::random();
    let text = String::from_utf8_lossy(rest);
    // A clock taken from the input too, so expiry arithmetic sees extreme values.
    let now = match rest.get(..8) {
        Some(b) => u64::from_le_bytes(b.try_into().unwrap_or([0; 8])),
        None => 0,
    };
    match mode % 3 {
        0 => {
            // A forged token: it must never verify.
            assert!(key.verify(&text, "svc", now).is_err());
        }
        1 => {
            // Signed claims of any shape.
            let _ = rfc3339(now);
            let json = rest.get(8..).unwrap_or_default();
            if let Ok(claims) = serde_json::from_slice::<Claims>(json) {
                let token = key.sign(&claims);
                if let Ok(back) = key.verify(&token, &claims.aud, now) {
                    assert_eq!(back, claims);
                }
                let _ = key.verify(&token, "other", now);
            }
        }
        _ => {
            let scopes = parse_scopes(text.split('&'));
            let access = grant(&scopes, |a, _| a != Action::Delete, mode & 4 == 0);
            for a in &access {
                assert!(!a.actions.is_empty());
                assert!(a.actions.iter().all(|x| x != "delete"));
            }
        }
    }
});
