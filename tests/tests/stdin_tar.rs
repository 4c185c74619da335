//! Tar streams into restore points (`flr backup --stdin-tar`): a running
//! PostgreSQL 15 cluster streamed by `pg_basebackup -Ft -X fetch` becomes
//! a restore point that a server starts on directly from a writable
//! mount, answering as the source did; an incremental after a 1% update
//! stores little. Cut, malformed and hostile streams commit nothing and
//! say where they broke.

use std::io::Write;
use std::path::Path;

use flr_e2e::postgres::{init_cluster, items_fingerprint, load_items, make_reachable};
use flr_e2e::tarball::Tar;
use flr_e2e::tree::assert_same_tree;
use flr_e2e::{scratch, PgServer, TestRepo, WritableMount};

fn backup_json(run: flr_e2e::Run) -> serde_json::Value {
    let run = run.success();
    run.json()
}

#[test]
fn a_base_backup_stream_starts_on_a_writable_mount_and_its_incremental_is_small() {
    let tmp = scratch("tar-pg");
    make_reachable(&tmp.path().join("any"));
    let src = tmp.path().join("src").join("pgdata");
    init_cluster(&src);
    let server = PgServer::start(&src);
    // About 60 MB of table and index pages.
    load_items(&server, 1, 250_000);
    server.query("CHECKPOINT;");
    let at_backup = items_fingerprint(&server);

    let repo = TestRepo::init(&tmp.path().join("repo"));
    let first = backup_json(server.base_backup_into(&repo, "pg"));
    let first_rp = first["restore_point"].as_str().unwrap().to_string();
    let first_added = first["stats"]["added_bytes"].as_u64().unwrap();
    let logical = first["stats"]["logical_bytes"].as_u64().unwrap();
    // The control: the same states copied to disk (`pg_basebackup -Fp`)
    // and backed up as files into a repository of their own.
    let files = TestRepo::init(&tmp.path().join("files-repo"));
    let copy_a = tmp.path().join("copy-a");
    server.base_backup(&copy_a);
    files.backup("pg", &[&copy_a]);

    // 1% of the rows change in place.
    server.query("UPDATE items SET amount = amount + 1 WHERE id % 100 = 0;");
    server.query("CHECKPOINT;");
    let after_update = items_fingerprint(&server);
    let second = backup_json(server.base_backup_into(&repo, "pg"));
    let second_added = second["stats"]["added_bytes"].as_u64().unwrap();
    let copy_b = tmp.path().join("copy-b");
    server.base_backup(&copy_b);
    std::fs::rename(&copy_b, tmp.path().join("b")).unwrap();
    std::fs::rename(&copy_a, tmp.path().join("a")).unwrap();
    // Same name as the first copy, so the two file backups line up.
    std::fs::rename(tmp.path().join("b"), &copy_a).unwrap();
    let files_added = files.backup("pg", &[&copy_a]).added_bytes();
    eprintln!(
        "stream of {logical} bytes: {first_added} added; after a 1% update: \
         {second_added} added, the same states as files: {files_added}"
    );
    // Changes after the second backup are in neither.
    load_items(&server, 250_001, 251_000);
    server.stop();
    // The relation files dedup page by page, as file backups do.
    assert!(
        second_added < first_added && second_added <= files_added * 3 / 2 + (1 << 20),
        "the incremental stream added {second_added} bytes (full: {first_added}), \
         the same change backed up as files {files_added}"
    );

    // A plain restore of the first restore point is the stream's files,
    // with their owners and modes (the data directory is the root).
    let out = tmp.path().join("out");
    repo.restore(&first_rp, &out, &[] as &[&str]);
    assert!(out.join("backup_label").is_file());
    assert!(out.join("PG_VERSION").is_file());

    // Started on a writable mount, it recovers from its backup_label and
    // answers as the source did when the stream was taken.
    let state = tmp.path().join("sessions");
    let mnt = WritableMount::background(&repo, &first_rp, &tmp.path().join("mnt"), &state, "s1");
    let session = PgServer::start(mnt.path());
    assert_eq!(session.query("SELECT pg_is_in_recovery();"), "f");
    assert_eq!(items_fingerprint(&session), at_backup);
    session.stop();
    drop(mnt);

    let second_rp = second["restore_point"].as_str().unwrap().to_string();
    let mnt = WritableMount::background(&repo, &second_rp, &tmp.path().join("mnt2"), &state, "s2");
    let session = PgServer::start(mnt.path());
    assert_eq!(items_fingerprint(&session), after_update);
    session.stop();
    drop(mnt);

    let verify = repo.verify_run(true);
    assert!(verify.status.success(), "{verify}");
}

fn tar_backup(repo: &TestRepo, stream: Vec<u8>) -> flr_e2e::Run {
    repo.cmd("backup")
        .args(["--job", "t", "--stdin-tar", "--json"])
        .stdin(stream)
        .run()
}

#[test]
fn cut_malformed_and_hostile_streams_commit_nothing() {
    let tmp = scratch("tar-bad");
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let good = Tar::new()
        .member(b"dir/", b'5', b"", b"")
        .file("dir/a.bin", &payload)
        .file("dir/b.txt", b"second")
        .member(b"dir/link", b'2', b"a.bin", b"")
        .member(b"dir/hard", b'1', b"dir/b.txt", b"")
        .end();

    // Cut inside a member, and cut at a member boundary (no
    // end-of-archive block): both refused, with the byte offset.
    let inside = tar_backup(&repo, good[..100_000].to_vec()).expect_code(1);
    assert!(
        inside.stderr.contains("byte 100000") && inside.stderr.contains("dir/a.bin"),
        "{inside}"
    );
    let boundary = good.len() - 1024;
    let cut = tar_backup(&repo, good[..boundary].to_vec()).expect_code(1);
    assert!(
        cut.stderr.contains("end-of-archive") && cut.stderr.contains(&format!("byte {boundary}")),
        "{cut}"
    );
    // A damaged header checksum.
    let mut damaged = good.clone();
    damaged[512 + 3] ^= 0x20;
    let bad = tar_backup(&repo, damaged).expect_code(1);
    assert!(bad.stderr.contains("byte"), "{bad}");

    // Names that leave the restore point.
    for name in [&b"../escape"[..], b"/etc/cron.d/x", b"dir/../../x"] {
        let stream = Tar::new()
            .file("ok", b"fine")
            .member(name, b'0', b"", b"evil")
            .end();
        let r = tar_backup(&repo, stream).expect_code(1);
        let shown = String::from_utf8_lossy(name).into_owned();
        assert!(r.stderr.contains(&shown), "{r}");
    }
    // A hard link to something not in the archive.
    let stream = Tar::new().member(b"h", b'1', b"/etc/passwd", b"").end();
    tar_backup(&repo, stream).expect_code(1);
    assert!(
        repo.restore_point_names().is_empty(),
        "a refused stream left a restore point: {:?}",
        repo.restore_point_names()
    );

    // The whole stream commits, with every kind of member.
    let ok = tar_backup(&repo, good).success().json();
    let rp = ok["restore_point"].as_str().unwrap();
    let out = tmp.path().join("out");
    repo.restore(rp, &out, &[] as &[&str]);
    assert_eq!(std::fs::read(out.join("dir/a.bin")).unwrap(), payload);
    assert_eq!(std::fs::read(out.join("dir/hard")).unwrap(), b"second");
    assert_eq!(
        std::fs::read_link(out.join("dir/link")).unwrap(),
        Path::new("a.bin")
    );
    assert_eq!(repo.restore_point_names().len(), 1);
}

#[test]
fn gnu_and_pax_streams_keep_long_names_links_sparse_files_and_metadata() {
    let tmp = scratch("tar-gnu");
    let src = tmp.path().join("src");
    let top = src.join("top");
    let long_dir = top.join("d".repeat(140));
    std::fs::create_dir_all(&long_dir).unwrap();
    std::fs::write(long_dir.join("n".repeat(200)), b"long name").unwrap();
    let data: Vec<u8> = (0..2_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(top.join("data.bin"), &data).unwrap();
    std::fs::hard_link(top.join("data.bin"), top.join("again.bin")).unwrap();
    std::os::unix::fs::symlink("data.bin", top.join("link")).unwrap();
    std::os::unix::fs::symlink("/nowhere/at/all", top.join("dangling")).unwrap();
    std::fs::create_dir(top.join("empty")).unwrap();
    let mut sparse = std::fs::File::create(top.join("sparse.img")).unwrap();
    sparse.set_len(64 << 20).unwrap();
    use std::io::Seek;
    sparse.seek(std::io::SeekFrom::Start(40 << 20)).unwrap();
    sparse.write_all(b"in the middle").unwrap();
    drop(sparse);
    use std::os::unix::fs::PermissionsExt;
    let mode = |rel: &str, m: u32| {
        std::fs::set_permissions(top.join(rel), std::fs::Permissions::from_mode(m)).unwrap()
    };
    mode("data.bin", 0o600);
    mode("empty", 0o750);
    // Whole seconds on every entry: the GNU format keeps no more.
    let mut all = vec![top.clone()];
    let mut i = 0;
    while i < all.len() {
        if all[i].is_dir() && !all[i].is_symlink() {
            for e in std::fs::read_dir(&all[i]).unwrap() {
                all.push(e.unwrap().path());
            }
        }
        i += 1;
    }
    for (i, path) in all.iter().enumerate().rev() {
        let t = filetime::FileTime::from_unix_time(1_600_000_000 + i as i64 * 1000, 0);
        filetime::set_symlink_file_times(path, t, t).unwrap();
    }
    let repo = TestRepo::init(&tmp.path().join("repo"));
    for format in ["gnu", "pax"] {
        let script = format!(
            "set -o pipefail; tar -C {src} --sparse --format={format} -cf - . \
             | {flr} backup --repo {repo} --job {format} --stdin-tar --json",
            src = src.display(),
            flr = flr_e2e::flr::flr_bin().display(),
            repo = repo.path.display()
        );
        let r = flr_e2e::command::run(std::process::Command::new("bash").args(["-c", &script]))
            .success();
        let rp = r.json()["restore_point"].as_str().unwrap().to_string();
        let out = tmp.path().join(format!("out-{format}"));
        repo.restore(&rp, &out, &[] as &[&str]);
        assert_same_tree(&top, &out.join("top"));
    }
}
