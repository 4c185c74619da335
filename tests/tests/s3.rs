//! Repositories on S3: the real binary against a real S3 server (s3s-fs on
//! a loopback port, started per test and stopped on drop). Everything a
//! local repository does is done again on S3, plain and encrypted:
//! backup, restore byte for byte, a read-only mount queried by sqlite3, a
//! writable session committed as a new restore point, verify with data,
//! repair of a lost index file. Credentials must show up in no output.

use std::path::Path;

use flr_e2e::command::Run;
use flr_e2e::mount::{Mount, WritableMount};
use flr_e2e::s3::{S3Server, SECRET_KEY};
use flr_e2e::sqlite::{create_shop, sqlite3};
use flr_e2e::tree::{assert_cmp, assert_same_tree, build_rich_tree};
use flr_e2e::{scratch, Flr, TestRepo};
use serde_json::Value;

/// Every output a test saw, to check that no credential is in any.
#[derive(Default)]
struct Seen(Vec<String>);

impl Seen {
    fn keep(&mut self, r: &Run) {
        self.0.push(format!("{}\n{}", r.stdout, r.stderr));
    }

    fn keep_text(&mut self, s: String) {
        self.0.push(s);
    }

    #[track_caller]
    fn assert_no_secret(&self) {
        for out in &self.0 {
            assert!(
                !out.contains(SECRET_KEY),
                "the secret access key appears in output:\n{out}"
            );
        }
    }
}

#[track_caller]
fn requests(v: &Value) -> &Value {
    let r = &v["requests"];
    assert!(r.is_object(), "no requests object in {v}");
    r
}

#[track_caller]
fn count(r: &Value, kind: &str) -> u64 {
    r[kind]
        .as_u64()
        .unwrap_or_else(|| panic!("requests.{kind} missing in {r}"))
}

fn full_cycle(test: &str, password: Option<&str>) {
    let tmp = scratch(test);
    let server = S3Server::start(&tmp.path().join("s3"), &["backups"]);
    let repo = server.init_repo("backups", "flr/main", password);
    let mut seen = Seen::default();

    // Backup: a tree of every kind of file, and a SQLite database.
    let src = tmp.path().join("src");
    build_rich_tree(&src, 7);
    let db_dir = tmp.path().join("db");
    std::fs::create_dir(&db_dir).unwrap();
    let db = db_dir.join("shop.db");
    create_shop(&db, 2_000, 40_000);
    sqlite3(&db, "PRAGMA wal_checkpoint(TRUNCATE);").success();
    let files = repo.backup("files", &[&src]);
    seen.keep(&files.run);
    let up = files.run.json();
    let r = requests(&up);
    assert!(
        count(r, "put") >= 3,
        "a pack, its index and a manifest: {r}"
    );
    assert!(
        count(r, "bytes_up") >= files.added_bytes(),
        "bytes up {r} below the bytes added {}",
        files.added_bytes()
    );
    // A backup deletes nothing but its own lock's objects (object_store
    // sends each delete as a bulk-delete POST, counted as a delete).
    assert!(count(r, "delete") <= 2, "{r}");
    assert!(
        !server
            .objects("backups", "flr/main")
            .iter()
            .any(|o| o.starts_with("locks/")),
        "the backup left its lock"
    );
    let shop = repo.backup("shop", &[&db_dir]);
    seen.keep(&shop.run);
    assert_eq!(repo.restore_point_names().len(), 2);

    // Restore, byte for byte.
    let out = tmp.path().join("out");
    let restored = repo
        .cmd("restore")
        .arg(&files.restore_point)
        .arg("--to")
        .arg(&out)
        .arg("--json")
        .run()
        .success();
    seen.keep(&restored);
    let down = restored.json();
    assert!(count(requests(&down), "range_get") > 0, "{down}");
    // A restore writes only its reader lock (which keeps forget and
    // prune off the restore point while it runs): one small object.
    assert!(
        count(requests(&down), "put") <= 1 && count(requests(&down), "bytes_up") < 4096,
        "a restore writes nothing but its lock: {down}"
    );
    let top = src.file_name().unwrap();
    assert_same_tree(&src, &out.join(top));

    // A read-only mount, queried by sqlite3 through the kernel.
    let mnt = tmp.path().join("mnt");
    let queries = [
        "SELECT count(*), sum(amount_cents) FROM orders;",
        "SELECT c.city, count(*) FROM orders o JOIN customers c ON c.id = o.customer_id GROUP BY c.city ORDER BY c.city;",
        "SELECT * FROM orders WHERE id IN (1, 777, 39999);",
    ];
    {
        let mount = Mount::background(&repo, &mnt, &["--job", "shop"]);
        seen.keep_text(mount.messages());
        let mounted = mount.join(format!("{}/db/shop.db", shop.restore_point));
        assert_cmp(&db, &mounted);
        let uri = format!("file:{}?immutable=1", mounted.display());
        for q in queries {
            let expected = sqlite3(&db, q).success();
            let got = sqlite3(&uri, q).success();
            assert_eq!(got.stdout, expected.stdout, "{q}");
        }
        mount.unmount();
    }

    // A writable session over S3, committed as a new restore point.
    let state = tmp.path().join("state");
    let wmnt = tmp.path().join("wmnt");
    let committed = {
        let w = WritableMount::background(&repo, &shop.restore_point, &wmnt, &state, "s3-session");
        sqlite3(
            w.join("db/shop.db"),
            "PRAGMA journal_mode=DELETE; UPDATE orders SET note = 'changed on s3' WHERE id = 5;",
        )
        .success();
        std::fs::write(w.join("db/added.txt"), b"written in a session\n").unwrap();
        let c = repo
            .flr([
                "session",
                "commit",
                "s3-session",
                "--job",
                "edited",
                "--json",
            ])
            .arg("--state-dir")
            .arg(&state)
            .run()
            .success();
        seen.keep(&c);
        seen.keep_text(w.messages());
        c.json()["restore_point"]
            .as_str()
            .expect("commit names its restore point")
            .to_string()
    };
    let edited = tmp.path().join("edited");
    repo.restore(&committed, &edited, &[] as &[&str]);
    assert_eq!(
        std::fs::read(edited.join("db/added.txt")).unwrap(),
        b"written in a session\n"
    );
    let note = sqlite3(
        edited.join("db/shop.db"),
        "SELECT note FROM orders WHERE id = 5;",
    )
    .success();
    assert_eq!(note.stdout.trim(), "changed on s3");

    // Verify re-reads every pack.
    let v = repo.verify_run(true).success();
    seen.keep(&v);
    let report = v.json();
    assert_eq!(report["clean"], true, "{report}");
    assert!(report["chunks_checked"].as_u64().unwrap() > 0, "{report}");
    assert!(count(requests(&report), "get") > 0, "{report}");

    // A lost index file is rebuilt from its pack.
    let objects = server.objects("backups", "flr/main");
    let index = objects
        .iter()
        .find(|o| o.starts_with("index/") && o.ends_with(".idx"))
        .unwrap_or_else(|| panic!("no index object in {objects:?}"));
    std::fs::remove_file(server.root.join("backups/flr/main").join(index)).unwrap();
    let broken = repo.verify_run(false);
    seen.keep(&broken);
    assert_ne!(
        broken.json()["clean"],
        true,
        "verify missed a lost index: {broken}"
    );
    let repaired = repo
        .flr(["repair", "index", "--json", "--repo"])
        .arg(&repo.path)
        .run()
        .success();
    seen.keep(&repaired);
    assert_eq!(
        repaired.json()["rebuilt"].as_array().map(Vec::len),
        Some(1),
        "{repaired}"
    );
    let v = repo.verify_run(true).success();
    seen.keep(&v);
    assert_eq!(v.json()["clean"], true, "{v}");
    let again = tmp.path().join("again");
    repo.restore(&files.restore_point, &again, &[] as &[&str]);
    assert_same_tree(&src, &again.join(top));

    seen.assert_no_secret();
}

#[test]
fn everything_works_on_an_s3_repository() {
    full_cycle("s3-plain", None);
}

#[test]
fn everything_works_on_an_encrypted_s3_repository() {
    full_cycle("s3-encrypted", Some("s3 password"));
}

#[test]
fn a_scheme_flr_does_not_serve_is_refused_and_nothing_is_created() {
    let tmp = scratch("s3-scheme");
    for url in [
        "gs://bucket/prefix",
        "foo://x",
        "S3://bucket/p",
        "s3:bucket",
    ] {
        let mut cmd = Flr::new(["init", url]).into_command();
        cmd.current_dir(tmp.path());
        let r = flr_e2e::run(&mut cmd).failure();
        assert!(
            r.stderr.contains(url) && r.stderr.contains("s3://BUCKET/PREFIX"),
            "{url}: {r}"
        );
        let r = Flr::new(["backup", "--job", "j", "--repo", url])
            .arg(tmp.path())
            .run()
            .failure();
        assert!(r.stderr.contains("s3://BUCKET/PREFIX"), "{url}: {r}");
        let r = Flr::new(["verify", "--repo", url]).run().failure();
        assert!(r.stderr.contains("s3://BUCKET/PREFIX"), "{url}: {r}");
    }
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "something was created: {left:?}");
}

#[test]
fn a_wrong_secret_fails_cleanly_without_showing_it() {
    let tmp = scratch("s3-creds");
    let server = S3Server::start(&tmp.path().join("s3"), &["bkt"]);
    let repo = server.init_repo("bkt", "r", None);
    let wrong = "not-the-secret-4d1c9e";
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), b"data").unwrap();
    let bad = TestRepo {
        path: repo.path.clone(),
        password: None,
        env: server
            .env()
            .into_iter()
            .map(|(k, v)| {
                if k == "AWS_SECRET_ACCESS_KEY" {
                    (k, wrong.to_string())
                } else {
                    (k, v)
                }
            })
            .collect(),
    };
    let r = bad
        .cmd("backup")
        .args(["--job", "j", "--json"])
        .arg(&src)
        .run()
        .failure();
    assert!(
        !r.stdout.contains(wrong) && !r.stderr.contains(wrong),
        "{r}"
    );
    assert!(
        r.stderr.contains("s3://bkt/r"),
        "the error names the repository: {r}"
    );
    // Nothing was committed, and the right credentials still work.
    assert!(repo.restore_point_names().is_empty());
    let ok = repo.backup("j", &[&src]);
    assert_eq!(repo.restore_point_names(), vec![ok.restore_point.clone()]);
    let mut seen = Seen::default();
    seen.keep(&r);
    seen.keep(&ok.run);
    seen.assert_no_secret();
}

#[test]
fn init_refuses_a_prefix_that_holds_objects() {
    let tmp = scratch("s3-init");
    let server = S3Server::start(&tmp.path().join("s3"), &["bkt"]);
    let repo = server.init_repo("bkt", "r", None);
    let r = repo.flr(["init"]).arg(&repo.path).run().failure();
    assert!(r.stderr.contains("empty prefix"), "{r}");
    // A prefix beside it is empty.
    let _ = server.init_repo("bkt", "other", None);
    assert!(Path::new(&server.root.join("bkt/other/config")).is_file());
}
