//! `flr mount --nfs`: a restore point, or a writable session, served over
//! NFSv3 to libnfs's userspace client (this kernel has no NFS client):
//! the tree and every byte, a SQLite database giving the same answers,
//! refused writes on a read-only export, writes to a session visible after
//! its commit, a client outside the allowlist refused, and malformed RPC
//! streams that neither crash the server nor stop it serving.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use flr_e2e::nfs::NfsExport;
use flr_e2e::rng::Rng;
use flr_e2e::sqlite::{create_shop, sqlite3};
use flr_e2e::tree::{assert_cmp, write_random_file, MIB};
use flr_e2e::{scratch, TestRepo};
use nfs3_client::nfs3_types::nfs3::{
    createhow3, diropargs3, filename3, nfs_fh3, sattr3, stable_how, CREATE3args, LOOKUP3args,
    MKDIR3args, Nfs3Option, Nfs3Result, REMOVE3args, RENAME3args, SETATTR3args, WRITE3args,
};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::tokio::TokioConnector;
use nfs3_client::Nfs3ConnectionBuilder;

/// A source tree with one of each kind a restore point holds: a large
/// random file, a sparse file, an empty file, nested directories, names
/// with spaces and UTF-8, relative symlinks (to a file and a directory),
/// modes 0600/0755/0444, and a SQLite database.
fn build_source(src: &Path) {
    let mut rng = Rng::new(15);
    fs::create_dir_all(src.join("deep/er/still")).unwrap();
    fs::create_dir_all(src.join("name with spaces/äöü")).unwrap();
    write_random_file(&src.join("large.bin"), 24 * MIB + 12_345, &mut rng);
    let sparse = fs::File::create(src.join("sparse.img")).unwrap();
    sparse.set_len(40 * MIB).unwrap();
    {
        use std::os::unix::fs::FileExt;
        sparse.write_all_at(b"in the middle", 17 * MIB).unwrap();
        sparse.write_all_at(b"at the end", 40 * MIB - 10).unwrap();
    }
    fs::write(src.join("empty"), b"").unwrap();
    fs::write(src.join("deep/er/still/leaf.txt"), b"leaf\n").unwrap();
    fs::write(src.join("name with spaces/äöü/grüße.txt"), "grüße\n").unwrap();
    std::os::unix::fs::symlink("deep/er/still/leaf.txt", src.join("to-leaf")).unwrap();
    std::os::unix::fs::symlink("deep/er", src.join("to-dir")).unwrap();
    for (name, mode) in [("empty", 0o600), ("large.bin", 0o444)] {
        fs::set_permissions(src.join(name), fs::Permissions::from_mode(mode)).unwrap();
    }
    fs::set_permissions(src.join("deep"), fs::Permissions::from_mode(0o755)).unwrap();
    create_shop(&src.join("shop.db"), 2_000, 20_000);
    // The backup reads the database as a file: no WAL may be pending.
    sqlite3(src.join("shop.db"), "PRAGMA wal_checkpoint(TRUNCATE);").success();
}

/// The restore point's own directory name under its job.
fn timestamp(rp: &str) -> &str {
    rp.split_once('/').expect("JOB/TIMESTAMP").1
}

const QUERIES: &str = "SELECT count(*), sum(amount_cents) FROM orders;
SELECT city, count(*) FROM customers GROUP BY city ORDER BY city;
SELECT c.name, sum(o.amount_cents) FROM orders o JOIN customers c ON c.id = o.customer_id
  GROUP BY c.id ORDER BY 2 DESC, 1 LIMIT 5;";

#[test]
fn a_restore_point_over_nfs_is_the_source_byte_for_byte() {
    let tmp = scratch("nfs-tree");
    let src = tmp.path().join("src");
    build_source(&src);
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let rp = repo.backup("db", &[&src]).restore_point;
    let export = NfsExport::start(&repo, &tmp.path().join("export.log"), &[]);
    let root = format!("db/{}/src", timestamp(&rp));

    // The listing: every entry, its kind, permission bits and size.
    let listed = export.ls_recursive(&root);
    let mut expected = Vec::new();
    for entry in walkdir(&src) {
        let rel = entry
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let meta = fs::symlink_metadata(&entry).unwrap();
        let kind = if meta.file_type().is_symlink() {
            'l'
        } else if meta.is_dir() {
            'd'
        } else {
            '-'
        };
        let size = if meta.is_dir() {
            None
        } else {
            Some(meta.len())
        };
        expected.push((kind, meta.permissions().mode() & 0o777, size, rel));
    }
    expected.sort_by(|a, b| a.3.cmp(&b.3));
    let got: Vec<(char, u32, Option<u64>, String)> = listed
        .iter()
        .filter(|(_, _, path)| {
            path != "." && path != ".." && !path.ends_with("/.") && !path.ends_with("/..")
        })
        .map(|(mode, size, path)| {
            let kind = mode.chars().next().unwrap();
            let bits = mode_bits(&mode[1..]);
            let size = if kind == 'd' { None } else { Some(*size) };
            (kind, bits, size, path.clone())
        })
        .collect();
    // A read-only export shows modes without their write bits.
    let expected: Vec<_> = expected
        .into_iter()
        .map(|(k, m, s, p)| (k, if k == 'l' { m } else { m & 0o555 }, s, p))
        .collect();
    let strip_link_modes =
        |v: &[(char, u32, Option<u64>, String)]| -> Vec<(char, u32, Option<u64>, String)> {
            v.iter()
                .map(|(k, m, s, p)| (*k, if *k == 'l' { 0 } else { *m }, *s, p.clone()))
                .collect()
        };
    assert_eq!(
        strip_link_modes(&got),
        strip_link_modes(&expected),
        "the NFS listing differs from the source"
    );

    // Every regular file, byte for byte, through nfs-cat and nfs-cp.
    for rel in [
        "large.bin",
        "sparse.img",
        "empty",
        "deep/er/still/leaf.txt",
        "name with spaces/äöü/grüße.txt",
    ] {
        let bytes = export.cat(&format!("{root}/{rel}"));
        assert!(
            bytes == fs::read(src.join(rel)).unwrap(),
            "{rel}: the bytes read over NFS differ from the source"
        );
    }
    let out = tmp.path().join("copied.bin");
    export
        .copy_out(&format!("{root}/large.bin"), &out)
        .success();
    assert_cmp(&out, &src.join("large.bin"));
    // Paths through symlinks resolve: the job's `latest` link and links
    // inside the restore point.
    assert_eq!(export.cat("db/latest/src/to-leaf"), b"leaf\n");
    assert_eq!(export.cat("db/latest/src/to-dir/still/leaf.txt"), b"leaf\n");

    // SQLite gives the same answers from the database copied over NFS.
    let copy = tmp.path().join("shop-copy.db");
    export.copy_out(&format!("{root}/shop.db"), &copy).success();
    let over_nfs = sqlite3(&copy, QUERIES).success().stdout;
    let direct = sqlite3(src.join("shop.db"), QUERIES).success().stdout;
    assert_eq!(over_nfs, direct);
    assert!(over_nfs.contains("20000|"), "{over_nfs}");

    // Writes are refused, and the export still serves afterwards.
    let local = tmp.path().join("local.txt");
    fs::write(&local, b"must not land").unwrap();
    let refused = export.copy_in(&local, &format!("{root}/new.txt"));
    assert!(
        !refused.status.success(),
        "a write to a read-only export succeeded: {refused}"
    );
    let refused = export.copy_in(&local, &format!("{root}/empty"));
    assert!(
        !refused.status.success(),
        "an overwrite on a read-only export succeeded: {refused}"
    );
    assert_eq!(export.cat(&format!("{root}/empty")), b"");
    assert_eq!(
        export.cat(&format!("{root}/deep/er/still/leaf.txt")),
        b"leaf\n"
    );
    let messages = export.stop();
    assert!(messages.contains("NFS export nfs://"), "{messages}");
    // The restore point did not change.
    repo.verify_run(true).success();
}

/// A writable session `id` of restore point `rp` exported over NFS, its
/// state under `state`.
fn export_session(repo: &TestRepo, log: &Path, rp: &str, id: &str, state: &Path) -> NfsExport {
    let state = state.to_str().expect("the tests' scratch paths are UTF-8");
    NfsExport::start(
        repo,
        log,
        &[
            "--restore-point",
            rp,
            "--writable",
            "--session",
            id,
            "--state-dir",
            state,
        ],
    )
}

/// `flr session commit ID --job JOB`, then a restore of the new restore
/// point into `out`; returns the restore point's name.
fn commit_and_restore(repo: &TestRepo, state: &Path, id: &str, job: &str, out: &Path) -> String {
    let committed = repo
        .flr([
            "session",
            "commit",
            id,
            "--job",
            job,
            "--json",
            "--state-dir",
        ])
        .arg(state)
        .run()
        .success()
        .json();
    let rp = committed["restore_point"]
        .as_str()
        .unwrap_or_else(|| panic!("no restore point in {committed}"))
        .to_string();
    repo.restore(&rp, out, &[] as &[&str]).success();
    rp
}

#[test]
fn writes_to_a_session_over_nfs_are_in_its_commit() {
    let tmp = scratch("nfs-session");
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("data")).unwrap();
    fs::write(src.join("data/keep.txt"), b"kept\n").unwrap();
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let rp = repo.backup("app", &[&src]).restore_point;
    let state = tmp.path().join("state");
    let export = export_session(&repo, &tmp.path().join("export.log"), &rp, "nfs1", &state);
    // A writable session is served rooted at the restore point's root.
    let mut rng = Rng::new(7);
    let payload = tmp.path().join("payload.bin");
    write_random_file(&payload, 3 * MIB + 5, &mut rng);
    export.copy_in(&payload, "src/data/new.bin").success();
    let note = tmp.path().join("note.txt");
    fs::write(&note, b"written over NFS\n").unwrap();
    export.copy_in(&note, "src/note.txt").success();
    assert_eq!(export.cat("src/data/new.bin"), fs::read(&payload).unwrap());
    assert_eq!(export.cat("src/note.txt"), b"written over NFS\n");
    // libnfs's nfs-cp creates exclusively: an existing name is refused,
    // and the file keeps its bytes.
    let refused = export.copy_in(&note, "src/data/keep.txt");
    assert!(
        !refused.status.success(),
        "nfs-cp replaced an existing file: {refused}"
    );
    assert_eq!(export.cat("src/data/keep.txt"), b"kept\n");

    // Commit while exported, through the session's control socket.
    let out = tmp.path().join("restored");
    commit_and_restore(&repo, &state, "nfs1", "app-nfs", &out);
    assert_cmp(&out.join("src/data/new.bin"), &payload);
    assert_eq!(
        fs::read(out.join("src/note.txt")).unwrap(),
        b"written over NFS\n"
    );
    assert_eq!(fs::read(out.join("src/data/keep.txt")).unwrap(), b"kept\n");
    // The original restore point is as it was.
    let before = tmp.path().join("before");
    repo.restore(&rp, &before, &[] as &[&str]).success();
    assert!(!before.join("src/data/new.bin").exists());
    assert!(!before.join("src/note.txt").exists());

    // A discard ends the export and removes the session.
    repo.flr(["session", "discard", "nfs1", "--state-dir"])
        .arg(&state)
        .run()
        .success();
    assert!(
        flr_e2e::command::wait_for_exit(export.pid, Duration::from_secs(30)),
        "the export still runs after its session was discarded:\n{}",
        export.messages()
    );
    assert!(
        !state.join("nfs1").exists(),
        "the session's directory is left"
    );
}

/// A call's result, or a panic naming the call and its status.
fn ok<T, E: std::fmt::Debug>(what: &str, r: Nfs3Result<T, E>) -> T {
    match r {
        Nfs3Result::Ok(v) => v,
        Nfs3Result::Err((stat, fail)) => panic!("{what}: {stat:?} {fail:?}"),
    }
}

/// The handle of `name` in directory `dir`.
async fn lookup<IO>(c: &mut nfs3_client::Nfs3Client<IO>, dir: &nfs_fh3, name: &str) -> nfs_fh3
where
    IO: nfs3_client::io::AsyncRead + nfs3_client::io::AsyncWrite + Send,
{
    let what = diropargs3 {
        dir: dir.clone(),
        name: filename3(Opaque::borrowed(name.as_bytes())),
    };
    let r = c.lookup(&LOOKUP3args { what }).await.expect("LOOKUP");
    ok(&format!("LOOKUP {name}"), r).object
}

/// Writes `data` at offset 0 of `file`.
async fn write<IO>(
    c: &mut nfs3_client::Nfs3Client<IO>,
    file: nfs_fh3,
    data: &[u8],
    stable: stable_how,
) where
    IO: nfs3_client::io::AsyncRead + nfs3_client::io::AsyncWrite + Send,
{
    let args = WRITE3args {
        file,
        offset: 0,
        count: data.len() as u32,
        stable,
        data: Opaque::borrowed(data),
    };
    ok("WRITE", c.write(&args).await.expect("WRITE"));
}

#[test]
fn a_session_takes_overwrites_truncates_renames_and_removes_over_nfs() {
    let tmp = scratch("nfs-session-ops");
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("keep.txt"), b"kept\n").unwrap();
    fs::write(src.join("trunc.txt"), b"0123456789").unwrap();
    fs::write(src.join("gone.txt"), b"to be removed\n").unwrap();
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let rp = repo.backup("ops", &[&src]).restore_point;
    let state = tmp.path().join("state");
    let export = export_session(&repo, &tmp.path().join("export.log"), &rp, "ops1", &state);
    let port = export.port();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut conn = Nfs3ConnectionBuilder::new(TokioConnector, "127.0.0.1", "/")
            .connect_from_privileged_port(false)
            .mount_port(port)
            .nfs3_port(port)
            .mount()
            .await
            .expect("MOUNT over the export's one port");
        let root = conn.root_nfs_fh3();
        let c = &mut conn.nfs3_client;
        let dir = lookup(c, &root, "src").await;
        let at = |name: &'static str| diropargs3 {
            dir: dir.clone(),
            name: filename3(Opaque::borrowed(name.as_bytes())),
        };

        // Overwrite in place, durably; truncate through SETATTR.
        let keep = lookup(c, &dir, "keep.txt").await;
        write(c, keep, b"KEPT", stable_how::FILE_SYNC).await;
        let trunc = lookup(c, &dir, "trunc.txt").await;
        let truncate = SETATTR3args {
            object: trunc,
            new_attributes: sattr3 {
                size: Nfs3Option::Some(2),
                ..Default::default()
            },
            guard: Nfs3Option::None,
        };
        ok("SETATTR", c.setattr(&truncate).await.unwrap());
        // Create, write, rename over a new name.
        let create = CREATE3args {
            where_: at("tmp.txt"),
            how: createhow3::UNCHECKED(sattr3::default()),
        };
        let Nfs3Option::Some(tmp_fh) = ok("CREATE", c.create(&create).await.unwrap()).obj else {
            panic!("CREATE gave no handle")
        };
        write(c, tmp_fh, b"moved\n", stable_how::UNSTABLE).await;
        let rename = RENAME3args {
            from: at("tmp.txt"),
            to: at("final.txt"),
        };
        ok("RENAME", c.rename(&rename).await.unwrap());
        // Remove a file, make a directory.
        let remove = REMOVE3args {
            object: at("gone.txt"),
        };
        ok("REMOVE", c.remove(&remove).await.unwrap());
        let mkdir = MKDIR3args {
            where_: at("newdir"),
            attributes: sattr3::default(),
        };
        ok("MKDIR", c.mkdir(&mkdir).await.unwrap());
    });

    let out = tmp.path().join("restored");
    commit_and_restore(&repo, &state, "ops1", "ops-nfs", &out);
    let got = out.join("src");
    assert_eq!(fs::read(got.join("keep.txt")).unwrap(), b"KEPT\n");
    assert_eq!(fs::read(got.join("trunc.txt")).unwrap(), b"01");
    assert_eq!(fs::read(got.join("final.txt")).unwrap(), b"moved\n");
    assert!(!got.join("tmp.txt").exists() && !got.join("gone.txt").exists());
    assert!(got.join("newdir").is_dir());
    export.stop();
}

#[test]
fn clients_outside_the_allowlist_are_refused() {
    let tmp = scratch("nfs-allow");
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("secret.txt"), b"for allowed clients\n").unwrap();
    let repo = TestRepo::init(&tmp.path().join("repo"));
    repo.backup("j", &[&src]);

    let closed = NfsExport::start(
        &repo,
        &tmp.path().join("closed.log"),
        &["--nfs-allow", "10.9.9.0/24", "--nfs-allow", "fd00::/8"],
    );
    let r = closed.copy_out("j/latest/src/secret.txt", &tmp.path().join("got"));
    assert!(
        !r.status.success(),
        "a client outside the allowlist read a file: {r}"
    );
    assert!(
        !tmp.path().join("got").exists() || fs::read(tmp.path().join("got")).unwrap().is_empty()
    );
    let messages = closed.stop();
    assert!(
        messages.contains("not on the export's allowlist"),
        "the refusal is not logged:\n{messages}"
    );
    assert!(!messages.contains(" 0 clients refused"), "{messages}");

    let open = NfsExport::start(
        &repo,
        &tmp.path().join("open.log"),
        &["--nfs-allow", "127.0.0.1"],
    );
    assert_eq!(
        open.cat("j/latest/src/secret.txt"),
        b"for allowed clients\n"
    );
    open.stop();

    // A non-loopback address without an allowlist is refused up front.
    repo.flr(["mount", "--nfs", "0.0.0.0:0", "--repo"])
        .arg(&repo.path)
        .run()
        .failure()
        .stderr_has(&["--nfs-allow"]);
}

/// An RPC call record: the ONC RPC header for `prog`/`vers`/`proc` with
/// AUTH_NONE, then `args`.
fn rpc_call(xid: u32, prog: u32, vers: u32, proc_: u32, args: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    for word in [xid, 0, 2, prog, vers, proc_, 0, 0, 0, 0] {
        body.extend_from_slice(&word.to_be_bytes());
    }
    body.extend_from_slice(args);
    let mut rec = (0x8000_0000u32 | body.len() as u32).to_be_bytes().to_vec();
    rec.extend_from_slice(&body);
    rec
}

/// Sends `bytes` on a fresh connection, ends it, and reads until the
/// server closes.
fn send(addr: std::net::SocketAddr, bytes: &[u8]) {
    let mut s = TcpStream::connect(addr).expect("connect to the export");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let _ = s.read_to_end(&mut Vec::new());
}

/// Sends one call and reads one reply record (its fragments' bodies).
fn call(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect to the export");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).expect("send the call");
    let mut reply = Vec::new();
    loop {
        let mut mark = [0u8; 4];
        s.read_exact(&mut mark).expect("a reply's record mark");
        let mark = u32::from_be_bytes(mark);
        let mut body = vec![0u8; (mark & 0x7fff_ffff) as usize];
        s.read_exact(&mut body).expect("a reply's fragment");
        reply.extend_from_slice(&body);
        if mark & 0x8000_0000 != 0 {
            return reply;
        }
    }
}

#[test]
fn malformed_rpcs_neither_crash_nor_stop_the_server() {
    let tmp = scratch("nfs-malformed");
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a.txt"), b"still here\n").unwrap();
    let repo = TestRepo::init(&tmp.path().join("repo"));
    repo.backup("j", &[&src]);
    let export = NfsExport::start(&repo, &tmp.path().join("export.log"), &[]);
    let addr = export.addr;

    // A NULL call answers: the harness speaks the protocol.
    let reply = call(addr, &rpc_call(1, 100_003, 3, 0, &[]));
    assert!(reply.len() >= 24, "a short reply to NFS NULL: {reply:?}");
    assert_eq!(&reply[..4], &1u32.to_be_bytes(), "the reply's xid");
    assert_eq!(&reply[4..8], &1u32.to_be_bytes(), "a REPLY");

    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("a 2 GiB fragment", 0xffff_ffffu32.to_be_bytes().to_vec()),
        ("a fragment cut short", {
            let mut v = (0x8000_0000u32 | 1000).to_be_bytes().to_vec();
            v.extend_from_slice(&[0u8; 10]);
            v
        }),
        ("many small non-final fragments", {
            let mut v = Vec::new();
            for _ in 0..40_000 {
                v.extend_from_slice(&64u32.to_be_bytes());
                v.extend_from_slice(&[0u8; 64]);
            }
            v
        }),
        ("an unknown program", rpc_call(2, 999_999, 1, 0, &[])),
        ("NFS version 2", rpc_call(3, 100_003, 2, 1, &[])),
        ("an unknown procedure", rpc_call(4, 100_003, 3, 99, &[])),
        (
            "GETATTR of a truncated handle",
            rpc_call(5, 100_003, 3, 1, &[0, 0, 0, 200, 1, 2]),
        ),
        ("READ of a forged handle", {
            let mut args = 24u32.to_be_bytes().to_vec();
            args.extend_from_slice(&[0x41; 24]);
            args.extend_from_slice(&0u64.to_be_bytes());
            args.extend_from_slice(&4096u32.to_be_bytes());
            rpc_call(6, 100_003, 3, 6, &args)
        }),
        ("MOUNT of a path of 100 KiB", {
            let mut args = (100u32 << 10).to_be_bytes().to_vec();
            args.extend_from_slice(&vec![b'a'; 100 << 10]);
            rpc_call(7, 100_005, 3, 1, &args)
        }),
        ("a call with a bogus credential length", {
            let mut v = rpc_call(8, 100_003, 3, 0, &[]);
            v[4 + 28..4 + 32].copy_from_slice(&0x7fff_fff0u32.to_be_bytes());
            v
        }),
    ];
    // Seeded random records with a valid header shape.
    let mut rng = Rng::new(99);
    for i in 0..200u32 {
        let len = (rng.next_u64() % 300) as usize;
        let mut args = vec![0u8; len];
        for b in args.iter_mut() {
            *b = rng.next_u64() as u8;
        }
        let prog = [100_003, 100_005, 100_000][(rng.next_u64() % 3) as usize];
        let proc_ = (rng.next_u64() % 23) as u32;
        cases.push(("a random call", rpc_call(100 + i, prog, 3, proc_, &args)));
    }
    for (what, bytes) in &cases {
        send(addr, bytes);
        assert!(
            export.alive(),
            "the export died on {what}:\n{}",
            export.messages()
        );
    }
    // Still serving real clients, and raw ones.
    let reply = call(addr, &rpc_call(2, 100_003, 3, 0, &[]));
    assert_eq!(&reply[..4], &2u32.to_be_bytes(), "the reply's xid");
    assert_eq!(export.cat("j/latest/src/a.txt"), b"still here\n");
    let messages = export.stop();
    assert!(!messages.contains("panicked"), "{messages}");
}

/// `rwxr-xr-x` -> 0o755.
fn mode_bits(s: &str) -> u32 {
    s.chars()
        .take(9)
        .fold(0, |acc, c| (acc << 1) | u32::from(c != '-'))
}

/// Every path under `root` (not `root` itself), depth first.
fn walkdir(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}
