//! The examples printed in the C2SP tlog-checkpoint and tlog-proof specifications.

use crate::bundle::Node;
use tokenomy_receipts::*;

/// https://c2sp.org/tlog-checkpoint, the example note body.
#[test]
fn c2sp_checkpoint_example_body() {
    let body =
        "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n";
    let cp = Checkpoint::parse_body(body).unwrap();
    assert_eq!(
        (cp.origin.as_str(), cp.size),
        ("example.com/behind-the-sofa", 20_852_163)
    );
    assert_eq!(cp.to_body(), body);
}

/// https://c2sp.org/tlog-proof, the example proof (its signatures are elided with `[...]`,
/// so only the proof framing is checked, not the checkpoint).
#[test]
fn c2sp_tlog_proof_example_parses() {
    let text = "c2sp.org/tlog-proof@v1
extra YWdlLXYxLjIuMS1kYXJ3aW4tYXJtNjQudGFyLmd6kYXJ3aW4tYXJ
index 73894
gSKyXoYZUgZ6jduWYrkDOARinOMGJveXjgMkBTcdPlQ=
B95lDa8R83lS8n0eG+o0buTxRKQTYFi//1U8anccXmA=
EKNzoDWG8LGC0Yp9o+sv3qllpMP9uHQ9B20KNL+Q1zs=
RoopEkOdqkYqMB4MJXrbt/hMjOxsVn0IrWjpz1ZMMes=
AHCioX9nLjsrse6YhjRRmk1WUEirVOLLRoOQ6vfO5vk=

example.com/fancylog
109482
sFodV/vSp5O8n9a8QpW6PRY97tfOSW5bsc2Xl/EQi08=

\u{2014} example.com/fancylog hI2DJw[...]1roloI=
";
    let p = TlogProof::parse(text).unwrap();
    assert_eq!((p.index, p.hashes.len()), (73894, 5));
    assert!(p
        .extra
        .as_deref()
        .unwrap()
        .starts_with(b"age-v1.2.1-darwin-arm64.tar.gz"));
    assert!(p
        .checkpoint_note
        .starts_with("example.com/fancylog\n109482\n"));
    assert_eq!(p.format(), text);
}

#[test]
fn malformed_tlog_proofs_are_refused() {
    let node = Node::with_receipts(5);
    let good = node.tlog_proof(3).format();
    let bad = [
        good.replacen("c2sp.org/tlog-proof@v1", "c2sp.org/tlog-proof@v2", 1),
        good.replacen("index 3", "index 03", 1),
        good.replacen("index 3", "index -3", 1),
        good.replacen("index 3\n", "", 1),
        good.replacen("\n\n", "\n", 1),
        good.split("\n\n").next().unwrap().to_owned() + "\n\n",
        good.replacen("index 3\n", "index 3\nAAAA\n", 1),
    ];
    for b in bad {
        assert!(TlogProof::parse(&b).is_err(), "{b}");
    }
}

#[test]
fn checkpoint_needs_matching_origin_and_key() {
    let node = Node::with_receipts(3);
    let key = node.key.verifier();
    let cp = Checkpoint::new("someone.else/log", 3, node.tree.root());
    let note = cp.sign(&node.key).unwrap();
    assert!(matches!(
        Checkpoint::open(&note, &key),
        Err(CheckpointError::OriginMismatch { .. })
    ));
    let stranger = SignerKey::from_seed(crate::ORIGIN, &[9; 32])
        .unwrap()
        .verifier();
    assert!(matches!(
        Checkpoint::open(&node.checkpoint_note(3), &stranger),
        Err(CheckpointError::Signature(NoteError::NoVerifiedSignature))
    ));
}
