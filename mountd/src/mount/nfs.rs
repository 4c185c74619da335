//! `flr mount --nfs ADDR:PORT`: the same read-only tree, or the same
//! writable session, served over NFSv3 (`backends::nfs`) instead of a
//! local FUSE mount, until a signal (or, for a session, a discard).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::mpsc;

use backends::nfs::{NfsExport, NfsOptions};
use vfs_core::fs::{Caller, FsModel, ROOT_INO};

use super::*;

/// `ADDR:PORT`, `[V6ADDR]:PORT`, or a bare `PORT` on loopback.
fn parse_addr(spec: &str) -> Result<SocketAddr> {
    if let Ok(port) = spec.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    spec.parse().map_err(|_| {
        anyhow::anyhow!("--nfs {spec:?}: expected ADDR:PORT (for example 127.0.0.1:2049) or PORT")
    })
}

pub(super) fn run(args: &MountArgs, spec: &str) -> Result<u8> {
    let addr = parse_addr(spec)?;
    if args.nfs_allow.is_empty() && !addr.ip().is_loopback() {
        bail!(
            "--nfs {addr}: an export on a non-loopback address needs --nfs-allow NET, the clients that may connect (0.0.0.0/0 for every IPv4 client)"
        );
    }
    if args.background {
        return spawn_background();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(2))
        .thread_name("flr-nfs")
        .enable_all()
        .build()
        .context("cannot start the NFS server's runtime")?;
    if args.writable || args.resume.is_some() {
        run_session(args, addr, &rt)
    } else {
        run_read_only(args, addr, &rt)
    }
}

/// Nodes created over NFS belong to the owner of the export's root: the
/// protocol layer does not pass the caller's identity to the filesystem.
fn root_owner(fs: &dyn FsModel) -> Caller {
    match fs.getattr(ROOT_INO) {
        Ok(a) => Caller {
            uid: a.uid,
            gid: a.gid,
        },
        Err(_) => {
            let (uid, gid) = own_ids();
            Caller { uid, gid }
        }
    }
}

fn start(
    rt: &tokio::runtime::Runtime,
    fs: Arc<dyn FsModel>,
    addr: SocketAddr,
    args: &MountArgs,
) -> Result<NfsExport> {
    let owner = root_owner(&*fs);
    rt.block_on(backends::nfs::export(
        fs,
        addr,
        NfsOptions {
            allow: args.nfs_allow.clone(),
            owner,
        },
    ))
    .with_context(|| format!("cannot serve NFS at {addr}"))
}

/// Says where the export is and how to reach it, then prints the ready
/// line a background parent waits for.
fn announce(export: &NfsExport, what: &str) {
    let a = export.local_addr();
    let (host, port) = (a.ip(), a.port());
    say!(
        "flr: {what} exported over NFSv3 at {a}: `mount -t nfs -o vers=3,tcp,nolock,port={port},mountport={port} {host}:/ DIR`, or with libnfs nfs://{host}/?version=3&nfsport={port}&mountport={port}"
    );
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{READY}");
    let _ = out.flush();
}

/// Sends on `stop` at the first stop request (SIGINT or SIGTERM;
/// Ctrl-C on Windows).
fn stop_on_signal(stop: mpsc::Sender<()>) -> Result<()> {
    let interrupts =
        crate::interrupt::Interrupts::new().context("cannot install signal handlers")?;
    std::thread::spawn(move || {
        if let Some(sig) = interrupts.wait() {
            say!("flr: signal {sig}: stopping the NFS export");
            let _ = stop.send(());
        }
    });
    Ok(())
}

fn run_read_only(args: &MountArgs, addr: SocketAddr, rt: &tokio::runtime::Runtime) -> Result<u8> {
    let repo_path = args.repo.as_ref().expect("required without --resume");
    let fs = open_repo_fs(args)?;
    let export = start(rt, fs.clone(), addr, args)?;
    let shown = PathBuf::from(format!("nfs://{}", export.local_addr()));
    let (stop_tx, stop_rx) = mpsc::channel();
    stop_on_signal(stop_tx)?;
    announce(&export, &format!("{repo_path} (read-only)"));
    let _ = stop_rx.recv();
    let counters = export.counters.clone();
    rt.block_on(export.stop());
    report_exports(&counters, &shown);
    report_reads(&fs, &shown);
    Ok(exit::OK)
}

fn run_session(args: &MountArgs, addr: SocketAddr, rt: &tokio::runtime::Runtime) -> Result<u8> {
    let Session {
        cow,
        id,
        rp,
        resume,
        state_dir,
        ..
    } = open_writable(args)?;
    let export = match start(rt, cow.clone(), addr, args) {
        Ok(e) => e,
        Err(e) => {
            // A session made just now holds nothing yet.
            let _ = cow.close(resume);
            return Err(e);
        }
    };
    let shown = PathBuf::from(format!("nfs://{}", export.local_addr()));
    let (stop_tx, stop_rx) = mpsc::channel();
    stop_on_signal(stop_tx.clone())?;

    // A discard through the control socket stops the export, then waits
    // here until the session is gone.
    let discarded = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = mpsc::channel::<std::result::Result<(), String>>();
    let done_rx = parking_lot::Mutex::new(done_rx);
    let flag = discarded.clone();
    let control = writable::serve_control(cow.clone(), move || {
        flag.store(true, Ordering::SeqCst);
        let _ = stop_tx.send(());
        match done_rx.lock().recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => bail!("{e}"),
            Err(_) => bail!("the export process ended first"),
        }
    })
    .map_err(|e| {
        say!("flr: warning: {e:#}; `flr session commit|discard {id}` cannot reach this export")
    })
    .ok();
    announce(
        &export,
        &format!(
            "writable session {id} of {rp} (changes go to {})",
            cow.dir().display()
        ),
    );
    let _ = stop_rx.recv();
    let counters = export.counters.clone();
    rt.block_on(export.stop());
    report_exports(&counters, &shown);
    close_session(
        args,
        cow,
        &id,
        &state_dir,
        discarded.load(Ordering::SeqCst),
        control,
        done_tx,
        &shown,
    )
}

fn report_exports(c: &backends::nfs::NfsCounters, shown: &Path) {
    use std::sync::atomic::Ordering::Relaxed;
    say!(
        "flr: NFS export {} ended: {} connections, {} clients refused, {} reads ({}), {} writes ({}), {} failed requests, {} bad handles",
        shown.display(),
        c.connections.load(Relaxed),
        c.refused_clients.load(Relaxed),
        c.reads.load(Relaxed),
        crate::cli::human(c.bytes_read.load(Relaxed)),
        c.writes.load(Relaxed),
        crate::cli::human(c.bytes_written.load(Relaxed)),
        c.errors.load(Relaxed),
        c.bad_handles.load(Relaxed),
    );
}

#[cfg(test)]
mod tests {
    use super::parse_addr;

    #[test]
    fn export_addresses_parse() {
        assert_eq!(parse_addr("2049").unwrap().to_string(), "127.0.0.1:2049");
        assert_eq!(
            parse_addr("0.0.0.0:20490").unwrap().to_string(),
            "0.0.0.0:20490"
        );
        assert_eq!(parse_addr("[::1]:7").unwrap().to_string(), "[::1]:7");
        assert!(parse_addr("localhost").is_err());
        assert!(parse_addr("1.2.3.4").is_err());
    }
}
