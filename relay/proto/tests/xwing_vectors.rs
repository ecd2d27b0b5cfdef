//! The X-Wing implementation we use, checked against the draft's own test vectors
//! (draft-connolly-cfrg-xwing-kem-06, Appendix C), kept as data in
//! `tests/data/xwing-draft-06.txt`.

use x_wing::{Decapsulate, Decapsulator, KeyExport};

struct Vector {
    seed: [u8; 32],
    eseed: [u8; 64],
    pk: Vec<u8>,
    ct: Vec<u8>,
    ss: [u8; 32],
}

fn hex(text: &str) -> Vec<u8> {
    assert!(text.len() % 2 == 0, "odd hex length");
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex digit"))
        .collect()
}

fn vectors() -> Vec<Vector> {
    let text = include_str!("data/xwing-draft-06.txt");
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let field = |name: &str| {
            block
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .map(hex)
        };
        let Some(seed) = field("seed") else { continue };
        out.push(Vector {
            seed: seed.try_into().expect("32-byte seed"),
            eseed: field("eseed").unwrap().try_into().expect("64-byte eseed"),
            pk: field("pk").unwrap(),
            ct: field("ct").unwrap(),
            ss: field("ss").unwrap().try_into().expect("32-byte ss"),
        });
    }
    out
}

#[test]
fn draft_06_test_vectors_pass() {
    let vectors = vectors();
    assert_eq!(vectors.len(), 3, "the draft has three vectors");
    for (i, v) in vectors.iter().enumerate() {
        let dk = x_wing::DecapsulationKey::from(v.seed);
        let ek = dk.encapsulation_key();
        assert_eq!(&ek.to_bytes()[..], &v.pk[..], "vector {i}: public key");
        let (ct, ss) = ek.encapsulate_deterministic(&v.eseed.into());
        assert_eq!(&ct[..], &v.ct[..], "vector {i}: ciphertext");
        assert_eq!(&ss[..], &v.ss[..], "vector {i}: encapsulated secret");
        assert_eq!(
            &dk.decapsulate(&ct)[..],
            &v.ss[..],
            "vector {i}: decapsulated secret"
        );

        // Our wrapper, as the relay uses it, decapsulates the draft's ciphertext to
        // the draft's secret: the preshared key rests on exactly that value.
        let relay = sidecar_proto::pq::RelayKem::from_secret(v.seed);
        assert_eq!(relay.public_key(), &v.pk[..], "vector {i}: wrapper key");
        let secret = relay.decapsulate(&v.ct).expect("draft ciphertext decodes");
        assert_eq!(secret.as_bytes(), &v.ss, "vector {i}: wrapper secret");
    }
}
