//! Signed-note known answers from Go's golang.org/x/mod/sumdb/note tests.

use crate::vectors::*;
use tokenomy_receipts::note::*;

#[test]
fn peter_neumann_keys_parse_and_match() {
    let v = VerifierKey::parse(PETER_VKEY).unwrap();
    assert_eq!(v.name(), "PeterNeumann");
    assert_eq!(v.key_hash(), 0xc74f20a3);
    assert_eq!(v.to_string(), PETER_VKEY);
    let s = SignerKey::parse(PETER_SKEY).unwrap();
    assert_eq!(s.verifier(), v);
    assert_eq!(s.to_key_string(), PETER_SKEY);
}

#[test]
fn peter_neumann_signature_is_byte_exact() {
    let s = SignerKey::parse(PETER_SKEY).unwrap();
    let note = sign_note(PETER_TEXT, &s).unwrap();
    assert_eq!(note, format!("{PETER_TEXT}\n{PETER_SIG_LINE}"));
}

#[test]
fn open_go_notes() {
    let peter = VerifierKey::parse(PETER_VKEY).unwrap();
    let enoch = VerifierKey::parse(ENOCH_VKEY).unwrap();
    let both = format!("{PETER_TEXT}\n{PETER_SIG_LINE}{ENOCH_SIG_LINE}");
    let n = open_note(&both, std::slice::from_ref(&peter)).unwrap();
    assert_eq!(n.text, PETER_TEXT);
    assert_eq!((n.sigs.len(), n.unverified_sigs.len()), (1, 1));
    assert_eq!(n.unverified_sigs[0].key_hash, 0xaf0cfe78);
    let n = open_note(&both, &[peter.clone(), enoch.clone()]).unwrap();
    assert_eq!((n.sigs.len(), n.unverified_sigs.len()), (2, 0));
    assert_eq!(open_note(&both, &[]), Err(NoteError::NoVerifiedSignature));
    let dup = format!("{PETER_TEXT}\n{ENOCH_SIG_LINE}");
    assert!(matches!(
        open_note(&dup, &[enoch.clone(), peter.clone(), enoch]),
        Err(NoteError::AmbiguousKey { .. })
    ));
}

#[test]
fn go_bad_notes_are_malformed() {
    let peter = VerifierKey::parse(PETER_VKEY).unwrap();
    let t = PETER_TEXT;
    let sig = PETER_SIG_LINE;
    let bad = [
        t.to_owned(),
        format!("{t}\n"),
        format!("{t}\n{}", &sig[..sig.len() - 1]),
        format!("\x01{t}\n{sig}"),
        format!("{t}\n\u{2014} Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="),
        format!("{t}\n{sig}Unexpected line.\n"),
        format!("{t}\n{}", sig.repeat(101)),
    ];
    for msg in bad {
        assert!(
            matches!(
                open_note(&msg, std::slice::from_ref(&peter)),
                Err(NoteError::Malformed(_))
            ),
            "{msg:?}"
        );
    }
    let tampered = format!("{t}\n{}ABCD{}", &sig[..60], &sig[60..]);
    assert!(matches!(
        open_note(&tampered, &[peter]),
        Err(NoteError::InvalidSignature { .. })
    ));
}

/// Go's `TestNewVerifier`: every proper substring and every single-byte increment is refused.
#[test]
fn go_mangled_keys_are_refused() {
    let b = PETER_VKEY.as_bytes();
    for i in 0..=b.len() {
        for j in i + 1..=b.len() {
            if (i, j) != (0, b.len()) {
                assert!(
                    VerifierKey::parse(&PETER_VKEY[i..j]).is_err(),
                    "{}",
                    &PETER_VKEY[i..j]
                );
            }
        }
    }
    for i in 0..b.len() {
        let mut m = b.to_vec();
        m[i] = m[i].wrapping_add(1);
        if let Ok(s) = std::str::from_utf8(&m) {
            assert!(VerifierKey::parse(s).is_err(), "{s}");
        }
    }
    assert!(VerifierKey::parse(
        "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY=="
    )
    .is_err());
    assert!(VerifierKey::parse(
        "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
    )
    .is_err());
}

#[test]
fn generated_keys_work() {
    let mut rng = rand::rngs::OsRng;
    let s = SignerKey::generate("EnochRoot", &mut rng).unwrap();
    let v = VerifierKey::parse(&s.verifier().to_string()).unwrap();
    let note = sign_note("hi\n", &s).unwrap();
    assert_eq!(open_note(&note, &[v]).unwrap().text, "hi\n");
    assert!(SignerKey::generate("bad name", &mut rng).is_err());
}
