//! The repository's on-disk structures, pinned byte for byte: the
//! envelope, the config, the encryption record and the keys it wraps, the
//! manifest and the tags of its enums. Each test builds a fixed value,
//! encodes it and compares with bytes committed here, then decodes the
//! committed bytes back. A failure here means the format changed: bump
//! the version that covers it and commit the new bytes. (Session files
//! are pinned in `session/format_tests.rs`; packs and index files by the
//! pack tests.)

use std::sync::Arc;

use vfs_core::crypto::{EncryptionConfig, Keys};
use vfs_core::format::{self, NodeRef};
use vfs_core::ids::ChunkId;
use vfs_core::manifest::{BackupStats, Content, Manifest, Node, NodeKind};
use vfs_core::repo::{RepoConfig, Repository, CONFIG_KEY};
use vfs_core::store::{MemoryStore, ObjectStore};

#[test]
fn envelope_bytes() {
    let sealed = format::seal_envelope(format::MANIFEST_MAGIC, format::FLAG_ZSTD, b"payload");
    let golden = concat!(
        "464c524d414e4900", // FLRMANI\0
        "01000000",         // envelope version
        "01000000",         // flags: zstd
        "0700000000000000", // payload length
        "7061796c6f6164",   // payload
        // blake3 of the above
        "af9232e50310747693117a8b23d3b5490f25758d737a6015e81ebfcd1f452c13",
    );
    assert_eq!(hex::encode(&sealed), golden);
    let bytes = hex::decode(golden).unwrap();
    let (flags, payload) = format::open_envelope("golden", format::MANIFEST_MAGIC, &bytes).unwrap();
    assert_eq!((flags, payload), (format::FLAG_ZSTD, &b"payload"[..]));
}

#[test]
fn magics() {
    assert_eq!(&format::CONFIG_MAGIC, b"FLRCONF\0");
    assert_eq!(&format::MANIFEST_MAGIC, b"FLRMANI\0");
    assert_eq!(&format::STATE_MAGIC, b"FLRSTAT\0");
    assert_eq!(&format::JOURNAL_MAGIC, b"FLRJRNL\0");
}

fn sample_config() -> RepoConfig {
    RepoConfig {
        version: 2,
        id: "00112233445566778899aabbccddeeff".into(),
        compression_level: 3,
        page_compression_level: 1,
        encryption: None,
    }
}

/// The config as `Repository::init` writes it: pretty JSON and a newline,
/// in an envelope with no flags.
const CONFIG_JSON: &str = r#"{
  "version": 2,
  "id": "00112233445566778899aabbccddeeff",
  "compression_level": 3,
  "page_compression_level": 1,
  "encryption": null
}
"#;
const CONFIG_ENVELOPE: &str = concat!(
    // FLRCONF\0, envelope version 1, no flags, 142 bytes.
    "464c52434f4e460001000000000000008e00000000000000",
    // CONFIG_JSON
    "7b0a20202276657273696f6e223a20322c0a2020226964223a20223030313132",
    "323333343435353636373738383939616162626363646465656666222c0a2020",
    "22636f6d7072657373696f6e5f6c6576656c223a20332c0a202022706167655f",
    "636f6d7072657373696f6e5f6c6576656c223a20312c0a202022656e63727970",
    "74696f6e223a206e756c6c0a7d0a",
    // blake3 of the above
    "cde41beee2000afa3a7ee964e1d360773d86e81e66d5fc85af3aa2f29ad618f0",
);

#[test]
fn config_bytes() {
    assert_eq!(
        format::REPO_VERSION,
        2,
        "the config below is of repository version 2: a new version needs new golden bytes"
    );
    let json = serde_json::to_string_pretty(&sample_config()).unwrap() + "\n";
    assert_eq!(json, CONFIG_JSON);
    let sealed = format::seal_envelope(format::CONFIG_MAGIC, 0, json.as_bytes());
    assert_eq!(hex::encode(&sealed), CONFIG_ENVELOPE);
    // A repository opens with exactly these bytes as its config.
    let store = Arc::new(MemoryStore::new());
    store
        .put(CONFIG_KEY, &hex::decode(CONFIG_ENVELOPE).unwrap())
        .unwrap();
    let repo = Repository::open(store, || Ok(Vec::new())).unwrap();
    assert_eq!(
        format!("{:?}", repo.config()),
        format!("{:?}", sample_config())
    );
}

/// An encryption record made with the password `golden`, salt 0x22 x 16,
/// the smallest Argon2id cost (8 KiB, one pass, one lane) and the master
/// key 0, 1, ..., 63 wrapped under nonce 0x11 x 24.
fn sample_encryption() -> EncryptionConfig {
    EncryptionConfig {
        kdf: "argon2id".into(),
        salt: "22".repeat(16),
        m_cost_kib: 8,
        t_cost: 1,
        p_cost: 1,
        wrapped_key: concat!(
            "111111111111111111111111111111111111111111111111",
            "f97df3612bc53fb2328888911ee723ea58eafd27c1e9deb07588c7bfd2defe0f",
            "bf3513a3f99dd79760be52d20cd442331a9dd355ef2dca8236abe494565661a1",
            "3f05ccad346eb04b81d366984c1352b9",
        )
        .into(),
    }
}

const ENCRYPTION_JSON: &str = concat!(
    r#"{"kdf":"argon2id","salt":"22222222222222222222222222222222","#,
    r#""m_cost_kib":8,"t_cost":1,"p_cost":1,"wrapped_key":""#,
    "111111111111111111111111111111111111111111111111",
    "f97df3612bc53fb2328888911ee723ea58eafd27c1e9deb07588c7bfd2defe0f",
    "bf3513a3f99dd79760be52d20cd442331a9dd355ef2dca8236abe494565661a1",
    "3f05ccad346eb04b81d366984c1352b9",
    r#""}"#,
);

/// `golden metadata` sealed under the data key (master key bytes 0..32)
/// with nonce 0x33 x 24: nonce | ciphertext | tag.
const SEALED_META: &str = concat!(
    "333333333333333333333333333333333333333333333333",
    "136cbd81f735766fd1ef54a43eb63ea66fc9d56dac074c908fdbcd1d32899e",
);

#[test]
fn encryption_record_bytes() {
    let json = serde_json::to_string(&sample_encryption()).unwrap();
    assert_eq!(json, ENCRYPTION_JSON);
    let back: EncryptionConfig = serde_json::from_str(ENCRYPTION_JSON).unwrap();
    assert_eq!(format!("{back:?}"), format!("{:?}", sample_encryption()));
}

/// The key layout: the wrapped key opens with the password, its second
/// half keys the ids and its first half opens sealed metadata.
#[test]
fn keys_unwrap_and_split_as_laid_out() {
    let repo = std::path::Path::new("golden");
    let keys = Keys::unlock(&sample_encryption(), b"golden", repo).unwrap();
    let master: Vec<u8> = (0..64).collect();
    assert_eq!(&keys.id_key[..], &master[format::ID_KEY]);
    let sealed = hex::decode(SEALED_META).unwrap();
    assert_eq!(sealed.len(), format::NONCE_LEN + 15 + format::TAG_LEN);
    assert_eq!(keys.open_meta(&sealed).unwrap(), b"golden metadata");
    assert!(matches!(
        Keys::unlock(&sample_encryption(), b"other", repo),
        Err(vfs_core::Error::WrongPassword(_))
    ));
}

/// New repositories get the KDF and lengths the format module names.
#[test]
fn new_keys_follow_the_layout() {
    let (_, config) = Keys::create(b"pw").unwrap();
    assert_eq!(config.kdf, format::KDF_NAME);
    assert_eq!(
        (config.m_cost_kib, config.t_cost, config.p_cost),
        (
            format::KDF_M_COST_KIB,
            format::KDF_T_COST,
            format::KDF_P_COST
        )
    );
    assert_eq!(config.salt.len(), 2 * format::KDF_SALT_LEN);
    assert_eq!(config.wrapped_key.len(), 2 * format::WRAPPED_KEY_LEN);
}

fn sample_manifest() -> Manifest {
    let node = |parent: u32, name: &str, kind: NodeKind, size: u64, content: Content| Node {
        parent,
        name: name.as_bytes().to_vec(),
        kind,
        mode: 0o640,
        uid: 1000,
        gid: 1001,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 123,
        size,
        target: if kind == NodeKind::Symlink {
            b"f".to_vec()
        } else {
            Vec::new()
        },
        content,
    };
    Manifest {
        job: "db".into(),
        name: "2023-11-14T22-13-20Z".into(),
        time: 1_700_000_000,
        hostname: "h".into(),
        stats: BackupStats {
            files: 2,
            dirs: 1,
            symlinks: 1,
            logical_bytes: 12_288,
            read_bytes: 8192,
            chunks: 2,
            new_chunks: 1,
            new_chunk_bytes: 100,
            new_meta_bytes: 200,
            duration_ms: 5,
            changed_while_reading: vec!["f".into()],
        },
        nodes: vec![
            node(0, "", NodeKind::Dir, 0, Content::Empty),
            node(
                0,
                "f",
                NodeKind::File,
                8192,
                Content::Fixed {
                    chunk_size: 4096,
                    chunks: vec![Some(ChunkId([0xab; 32])), None],
                },
            ),
            node(
                0,
                "v",
                NodeKind::File,
                4096,
                Content::Variable {
                    chunks: vec![(Some(ChunkId([0xcd; 32])), 4000), (None, 96)],
                },
            ),
            node(0, "l", NodeKind::Symlink, 1, Content::Empty),
        ],
    }
}

/// The postcard encoding of [`sample_manifest`].
const MANIFEST_POSTCARD: &str = concat!(
    // job, name, time, hostname
    "02646214323032332d31312d31345432322d31332d32305a80c49fd50c0168",
    // stats
    "02010180608040020164c80105010166",
    // four nodes; the root
    "04000000a003e807e90780c49fd50c7b000000",
    // `f`: fixed chunks, one stored and one hole
    "00016601a003e807e90780c49fd50c7b8040000180200201abababababababab",
    "abababababababababababababababababababababababab00",
    // `v`: content-defined chunks, one stored and one hole
    "00017601a003e807e90780c49fd50c7b802000020201cdcdcdcdcdcdcdcdcdcd",
    "cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcda01f0060",
    // `l`: a symlink to `f`
    "00016c02a003e807e90780c49fd50c7b01016600",
);

/// A manifest file of an unencrypted repository holding
/// [`sample_manifest`] (zstd-compressed, as `encode_meta` writes it).
const MANIFEST_FILE: &str = concat!(
    // FLRMANI\0, envelope version 1, zstd, 120 bytes.
    "464c524d414e490001000000010000007800000000000000",
    // A zstd frame of MANIFEST_POSTCARD
    "28b52ffd20c97d0300028616219029e96fe3df22a78f073b77cc898a88fece67",
    "63f4f96d43ed186cb5d00da19d645d6f8bfbb4104936ebc2b87d6c4b5e275fb7",
    "6d2355120510b50dac171c8136279f7c533c9838208960f01a758807833aa5ae",
    "41060909c80206005d711cd714ae64826b8e4de6495a0505",
    // blake3 of the above
    "fcb82ff5aa2b5b8d862f4f5a0ed61abcbfd8f98c31bb955e7513a9e056a8b647",
);

#[test]
fn manifest_bytes() {
    let m = sample_manifest();
    let bytes = postcard::to_allocvec(&m).unwrap();
    assert_eq!(hex::encode(&bytes), MANIFEST_POSTCARD);
    let back: Manifest = postcard::from_bytes(&hex::decode(MANIFEST_POSTCARD).unwrap()).unwrap();
    assert_eq!(back, m);
    // The file as stored decodes to the same manifest.
    let store = Arc::new(MemoryStore::new());
    Repository::init(store.as_ref(), None).unwrap();
    let repo = Repository::open(store, || Ok(Vec::new())).unwrap();
    let file = hex::decode(MANIFEST_FILE).unwrap();
    let decoded: Manifest = repo
        .decode_meta("golden", format::MANIFEST_MAGIC, &file)
        .unwrap();
    assert_eq!(decoded, m);
}

/// The tag each variant must encode to. A `match` without a catch-all, so
/// a new variant does not compile until it is given its tag here.
fn node_kind_tag(k: NodeKind) -> u8 {
    match k {
        NodeKind::Dir => 0,
        NodeKind::File => 1,
        NodeKind::Symlink => 2,
        NodeKind::Fifo => 3,
        NodeKind::Socket => 4,
        NodeKind::CharDevice => 5,
        NodeKind::BlockDevice => 6,
    }
}

fn content_tag(c: &Content) -> u8 {
    match c {
        Content::Empty => 0,
        Content::Fixed { .. } => 1,
        Content::Variable { .. } => 2,
    }
}

#[test]
fn node_kind_tags_are_pinned() {
    let kinds = [
        NodeKind::Dir,
        NodeKind::File,
        NodeKind::Symlink,
        NodeKind::Fifo,
        NodeKind::Socket,
        NodeKind::CharDevice,
        NodeKind::BlockDevice,
    ];
    for k in kinds {
        assert_eq!(
            postcard::to_allocvec(&k).unwrap(),
            [node_kind_tag(k)],
            "{k:?}"
        );
    }
}

#[test]
fn content_tags_are_pinned() {
    let contents = [
        Content::Empty,
        Content::Fixed {
            chunk_size: 1,
            chunks: Vec::new(),
        },
        Content::Variable { chunks: Vec::new() },
    ];
    for c in &contents {
        assert_eq!(
            postcard::to_allocvec(c).unwrap()[0],
            content_tag(c),
            "{c:?}"
        );
    }
}

#[test]
fn node_ref_tags_are_pinned() {
    assert_eq!(
        postcard::to_allocvec(&NodeRef::RestorePoint(5)).unwrap(),
        [0, 5]
    );
    assert_eq!(
        postcard::to_allocvec(&NodeRef::Session(format::FIRST_SESSION_NODE)).unwrap(),
        [1, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x40]
    );
}

#[test]
fn pack_header_and_trailer_bytes() {
    assert_eq!(&format::PACK_MAGIC, b"FLRPACK\0");
    assert_eq!(&format::PACK_TABLE_MAGIC, b"FLRPTAB\0");
    assert_eq!(&format::PACK_TRAILER_MAGIC, b"FLRPEND\0");
    assert_eq!(&format::INDEX_MAGIC, b"FLRINDX\0");
    assert_eq!(
        hex::encode(format::pack_header()),
        concat!("464c525041434b00", "02000000", "00000000")
    );
    assert_eq!(
        hex::encode(format::pack_trailer(0x0102)),
        concat!("0201000000000000", "464c5250454e4400")
    );
}

fn sample_entries() -> Vec<vfs_core::repo::IndexEntry> {
    let mut id = [0u8; 32];
    id.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
    vec![
        vfs_core::repo::IndexEntry {
            id: vfs_core::ids::ChunkId(id),
            offset: 16,
            stored_len: 300,
            raw_len: 4096,
            flags: format::CHUNK_ZSTD,
            frame_offset: 0,
            frame_raw_len: 8192,
        },
        vfs_core::repo::IndexEntry {
            id: vfs_core::ids::ChunkId([0xff; 32]),
            offset: 16,
            stored_len: 300,
            raw_len: 4096,
            flags: format::CHUNK_ZSTD,
            frame_offset: 4096,
            frame_raw_len: 8192,
        },
    ]
}

/// One entry as postcard writes it: the id's 32 bytes, then varints.
const ENTRY_TAIL_0: &str = "10ac02802001008040";
const ENTRY_TAIL_1: &str = "10ac0280200180208040";

#[test]
fn pack_table_and_index_file_bytes() {
    use vfs_core::repo::{IndexFile, PackTable};
    let ids: Vec<String> = sample_entries().iter().map(|e| e.id.to_hex()).collect();
    let table = PackTable {
        entries: sample_entries(),
    };
    let golden_table = format!("02{}{ENTRY_TAIL_0}{}{ENTRY_TAIL_1}", ids[0], ids[1]);
    assert_eq!(
        hex::encode(postcard::to_stdvec(&table).unwrap()),
        golden_table
    );
    let back: PackTable = postcard::from_bytes(&hex::decode(&golden_table).unwrap()).unwrap();
    assert_eq!(back, table);

    let file = IndexFile {
        pack: vfs_core::ids::PackId([0xab; 32]),
        pack_len: 1000,
        entries: sample_entries(),
    };
    let golden_index = format!("{}e807{golden_table}", "ab".repeat(32));
    assert_eq!(
        hex::encode(postcard::to_stdvec(&file).unwrap()),
        golden_index
    );
    let back: IndexFile = postcard::from_bytes(&hex::decode(&golden_index).unwrap()).unwrap();
    assert_eq!(back, file);
}

/// A whole pack as a backup of `PACKED` wrote it (stored raw: too short
/// to compress), committed so that readers of later builds still parse it.
const PACKED: &[u8] = b"golden pack content\n";

fn pack_of_packed() -> Vec<u8> {
    use vfs_core::backup::{backup, BackupOptions, Source, StdinSource};
    let store = Arc::new(MemoryStore::new());
    Repository::init(store.as_ref(), None).unwrap();
    let repo = Repository::open(store.clone(), || Ok(Vec::new())).unwrap();
    let source = Source::Stream(StdinSource {
        name: "f".into(),
        reader: Box::new(std::io::Cursor::new(PACKED.to_vec())),
        mode: 0o644,
        uid: 0,
        gid: 0,
    });
    let opts = BackupOptions {
        job: "g".into(),
        chunker: None,
        hostname: "h".into(),
        progress: Default::default(),
    };
    backup(&repo, source, &opts).unwrap();
    let key = store.list("packs/").unwrap().pop().unwrap();
    store.get(&key).unwrap()
}

const PACK_BYTES: &str = concat!(
    "464c525041434b000200000000000000", // header: FLRPACK\0, version 2
    "676f6c64656e207061636b20636f6e74656e740a", // the one frame, raw
    // the entry table: an envelope (FLRPTAB\0, version 1, zstd, 48 bytes),
    "464c52505441420001000000010000003000000000000000",
    "28b52ffd202739010001a19f1faab04515c27a1bff100bf4f38bae378afa717f97742a055acb13d869a3101414000014", // its zstd payload
    "eb6a9714c429e7942c208893df4327c2c9e0ca6be5afab2d81f2db044cbe456d", // its checksum
    "6800000000000000464c5250454e4400", // trailer: table length, FLRPEND\0
);

#[test]
fn a_committed_pack_parses_to_its_entries() {
    let bytes = hex::decode(PACK_BYTES).unwrap();
    let store = Arc::new(MemoryStore::new());
    Repository::init(store.as_ref(), None).unwrap();
    let repo = Repository::open(store, || Ok(Vec::new())).unwrap();
    let entries = repo.parse_pack("golden pack", &bytes).unwrap();
    assert_eq!(entries.len(), 1);
    let e = &entries[0];
    assert_eq!(e.id, vfs_core::ids::ChunkHasher::plain().id(PACKED));
    assert_eq!((e.offset, e.stored_len, e.raw_len), (16, 20, 20));
    assert_eq!((e.flags, e.frame_offset, e.frame_raw_len), (0, 0, 20));
    // The same bytes are what a backup writes today, up to zstd's own
    // output for the table, which a newer zstd may choose differently.
    let today = pack_of_packed();
    assert_eq!(today[..36], bytes[..36]);
    assert_eq!(repo.parse_pack("today", &today).unwrap(), entries);
    // Any damage is refused, never misread.
    for i in (0..bytes.len()).step_by(7) {
        let mut bad = bytes.clone();
        bad[i] ^= 0x10;
        if let Ok(got) = repo.parse_pack("damaged", &bad) {
            // Only the frame's own bytes are not covered by the table.
            assert!((16..36).contains(&i), "byte {i} damaged, still parsed");
            assert_eq!(got, entries);
        }
    }
}
