//! The session files' bytes, pinned: the journal header and records, the
//! checkpoint, and the tags of every enum they hold. A change that makes
//! any of these fail changes the format: bump `SESSION_FORMAT` and update
//! the bytes here.

use super::*;

const T: Time = (1_700_000_000, 5);
const S0: u64 = FIRST_SESSION_NODE;

fn rp(i: u32) -> NodeRef {
    NodeRef::RestorePoint(i)
}

fn new(k: u64) -> NodeRef {
    NodeRef::Session(S0 + k)
}

/// One record of each kind, with every field set to something other than
/// its default so each field shows in the bytes.
fn sample_ops() -> Vec<Op<NodeRef>> {
    vec![
        Op::Make {
            parent: rp(1),
            name: b"new".to_vec(),
            ino: new(0),
            kind: NodeKind::Symlink,
            mode: 0o644,
            uid: 1000,
            gid: 100,
            rdev: 7,
            target: b"t".to_vec(),
            time: T,
        },
        Op::Link {
            ino: rp(2),
            parent: new(1),
            name: b"l".to_vec(),
            time: T,
        },
        Op::Remove {
            parent: rp(0),
            name: b"r".to_vec(),
            dir: true,
            time: T,
        },
        Op::Rename {
            parent: rp(0),
            name: b"a".to_vec(),
            new_parent: new(2),
            new_name: b"b".to_vec(),
            exchange: true,
            no_replace: false,
            time: T,
        },
        Op::SetAttr {
            ino: rp(3),
            mode: Some(0o600),
            uid: None,
            gid: Some(5),
            size: Some(4096),
            atime: None,
            mtime: Some((-1, 999_999_999)),
            time: T,
        },
        Op::Write {
            ino: new(3),
            offset: 1 << 20,
            len: 8192,
            time: T,
        },
    ]
}

/// The records of [`sample_ops`], framed, in hex.
/// Each is length u32 | checksum (4) | postcard payload; the payload starts
/// with the variant's tag and names nodes as tag (0 restore point, 1
/// session) and varint.
const SAMPLE_RECORDS: [&str; 6] = [
    "1e000000e83bd98f000001036e6577018080808080804002a403e8076407017480c49fd50c05",
    "13000000fddd6f2a0100020181808080808040016c80c49fd50c05",
    "0c000000f617822002000001720180c49fd50c05",
    "17000000cac5c376030000016101828080808080400162010080c49fd50c05",
    "1a0000000d10f7a3040003018003000105018020000101ff93ebdc0380c49fd50c05",
    "14000000b6e25de9050183808080808040808040804080c49fd50c05",
];

/// The tag each variant must encode to. A `match` without a catch-all, so
/// a new variant does not compile until it is given its tag here.
fn op_tag(op: &Op<NodeRef>) -> u8 {
    match op {
        Op::Make { .. } => 0,
        Op::Link { .. } => 1,
        Op::Remove { .. } => 2,
        Op::Rename { .. } => 3,
        Op::SetAttr { .. } => 4,
        Op::Write { .. } => 5,
    }
}

fn body_tag(body: &Body<NodeRef>) -> u8 {
    match body {
        Body::File(_) => 0,
        Body::Dir { .. } => 1,
        Body::Symlink(_) => 2,
        Body::Special => 3,
    }
}

fn node_ref_tag(r: NodeRef) -> u8 {
    match r {
        NodeRef::RestorePoint(_) => 0,
        NodeRef::Session(_) => 1,
    }
}

#[test]
fn op_tags_are_pinned() {
    let ops = sample_ops();
    let mut seen: Vec<u8> = ops.iter().map(op_tag).collect();
    seen.dedup();
    assert_eq!(
        seen,
        [0, 1, 2, 3, 4, 5],
        "one sample of each variant, in order"
    );
    for op in &ops {
        let bytes = postcard::to_allocvec(op).unwrap();
        assert_eq!(bytes[0], op_tag(op), "{op:?}");
    }
}

#[test]
fn body_and_node_ref_tags_are_pinned() {
    let bodies: [Body<NodeRef>; 4] = [
        Body::File(FileState::default()),
        Body::Dir {
            parent: rp(0),
            children: BTreeMap::new(),
        },
        Body::Symlink(Vec::new()),
        Body::Special,
    ];
    for b in &bodies {
        assert_eq!(postcard::to_allocvec(b).unwrap()[0], body_tag(b), "{b:?}");
    }
    for r in [rp(0), new(0)] {
        assert_eq!(
            postcard::to_allocvec(&r).unwrap()[0],
            node_ref_tag(r),
            "{r:?}"
        );
    }
}

#[test]
fn journal_header_bytes() {
    let header = format::journal_header(0x0102_0304_0506_0708);
    assert_eq!(
        hex::encode(header),
        concat!(
            "464c524a524e4c00", // FLRJRNL\0
            "02000000",         // SESSION_FORMAT
            "00000000",         // flags
            "0807060504030201", // generation
        )
    );
    assert_eq!(
        format::check_journal_header("journal", &header).unwrap(),
        0x0102_0304_0506_0708
    );
}

#[test]
fn journal_record_bytes() {
    let mut journal = format::journal_header(9).to_vec();
    for (op, golden) in sample_ops().iter().zip(SAMPLE_RECORDS) {
        let record = encode_record(op).unwrap();
        assert_eq!(hex::encode(&record), golden, "{op:?}");
        journal.extend_from_slice(&hex::decode(golden).unwrap());
    }
    let (generation, ops, intact) = decode_journal("journal", &journal).unwrap();
    assert_eq!(generation, 9);
    assert_eq!(ops, sample_ops());
    assert_eq!(intact, journal.len() as u64);
}

fn sample_snapshot() -> Snapshot {
    let node = |kind: NodeKind, nlink: u32, body: Body<NodeRef>| Node {
        kind,
        mode: 0o755,
        uid: 1,
        gid: 2,
        nlink,
        rdev: 0,
        atime: (10, 1),
        mtime: (20, 2),
        ctime: T,
        body,
        open: 0,
    };
    let mut extents = RangeSet::default();
    extents.insert(0, 4096);
    extents.insert(8192, 8200);
    let mut children = BTreeMap::new();
    children.insert(b"d".to_vec(), rp(1));
    children.insert(b"n".to_vec(), new(0));
    Snapshot {
        format: SESSION_FORMAT,
        generation: 3,
        next_id: S0 + 2,
        nodes: vec![
            (
                rp(0),
                node(
                    NodeKind::Dir,
                    3,
                    Body::Dir {
                        parent: rp(0),
                        children,
                    },
                ),
            ),
            (
                rp(2),
                node(
                    NodeKind::File,
                    1,
                    Body::File(FileState {
                        from_restore_point: true,
                        base_len: 100,
                        size: 8200,
                        extents,
                        base_size: 200,
                        base_blocks: 8,
                    }),
                ),
            ),
            (
                new(0),
                node(NodeKind::Symlink, 1, Body::Symlink(b"x".to_vec())),
            ),
            (new(1), node(NodeKind::Fifo, 1, Body::Special)),
        ],
    }
}

/// The checkpoint of [`sample_snapshot`], envelope and all, in hex.
const SAMPLE_STATE: &str = concat!(
    // Envelope header: FLRSTAT\0, envelope version 1, no flags, 136 bytes.
    "464c52535441540001000000000000008800000000000000",
    // format 2, generation 3, next id 2^48 + 2, four nodes.
    "02038280808080804004",
    // Restore point node 0, the root: a directory (kind, mode, uid, gid,
    // nlink, rdev, times) holding `d` (node 1) and `n` (session node 2^48).
    "000000ed03010203001401280280c49fd50c050100000201640001016e0180808080808040",
    // Restore point node 2: a file of the restore point, 100 bytes of it
    // kept, 8200 long, with two written ranges.
    "000201ed03010201001401280280c49fd50c0500016488400200802080408840c80108",
    // Session node 2^48: a symlink to `x`; 2^48 + 1: a pipe.
    "018080808080804002ed03010201001401280280c49fd50c05020178018180808080804003ed03010201001401280280c49fd50c0503",
    // blake3 of all the above.
    "9d200a4224e7822da3a4bdbbceb091ee9d2ad055f69f1fd5ff839397ae761ddc",
);

#[test]
fn checkpoint_bytes() {
    let bytes = encode_state(&sample_snapshot()).unwrap();
    assert_eq!(hex::encode(&bytes), SAMPLE_STATE);
    let back = decode_state("state", &hex::decode(SAMPLE_STATE).unwrap()).unwrap();
    assert_eq!(back, sample_snapshot());
}

#[test]
fn data_file_names() {
    assert_eq!(rp(0x2a).data_file_name(), "r2a");
    assert_eq!(new(0).data_file_name(), "1000000000000");
}
