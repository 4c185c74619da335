//! Writes every target's seeds into `DIR/<target>/seed-<n>` (fuzz/run.sh
//! starts a target's corpus from them).

fn main() {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: fuzz-seeds DIR");
        std::process::exit(2);
    };
    let dir = std::path::PathBuf::from(dir);
    for (target, seeds) in flr_fuzz_checks::seeds::all() {
        let out = dir.join(target);
        std::fs::create_dir_all(&out).expect("seed directory");
        for (n, seed) in seeds.iter().enumerate() {
            std::fs::write(out.join(format!("seed-{n}")), seed).expect("seed file");
        }
        println!("{target}: {} seeds", seeds.len());
    }
}
