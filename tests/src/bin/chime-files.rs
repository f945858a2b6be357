//! `chime-files`: file transfer times and the daemon's memory during them, through a real
//! `chimed` on loopback (plaintext, the embedded store).
//!
//! It starts a `chimed` with the test harness (`CHIME_BIN_DIR=target/release` for the release
//! build), writes a file of `--mb` MiB of pseudo-random bytes in a temp dir, and with the blocking
//! client library: hashes it (the client's pass, timed apart), uploads it (UPLOAD_BEGIN to
//! FILE_STORED: the chunks, the server's hash check, fsync and record), downloads it from the
//! cache into a hasher (DOWNLOAD to the last FILE_CHUNK, verified), `--runs` times each. A thread
//! samples the daemon's VmRSS every 20 ms; VmHWM (the peak) is read at the end. Prints one JSON
//! object.

use anyhow::{ensure, Context, Result};
use chime_tests::daemon::{Daemon, DaemonOptions};
use clap::Parser;
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// File transfer times through a real chimed.
#[derive(Parser)]
struct Args {
    /// File size in MiB.
    #[arg(long, default_value_t = 100)]
    mb: u64,
    /// Uploads and downloads measured (each upload is a new file, so no dedupe).
    #[arg(long, default_value_t = 3)]
    runs: u32,
}

fn status_kib(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn write_file(path: &std::path::Path, size: u64, seed: u64) -> Result<()> {
    let mut f = fs::File::create(path)?;
    let mut x = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        for b in buf[..n].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let d = Daemon::start(DaemonOptions::default());
    let pid = d.pid().context("daemon pid")?;
    let idle_kib = status_kib(pid, "VmRSS:");
    let peak = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(status_kib(pid, "VmRSS:"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let dir = tempfile::tempdir()?;
    let size = args.mb << 20;
    let mut user = d.register("bench");
    let room = user.client.create_room("files").map_err(|e| anyhow::anyhow!("{e:?}"))?.room;
    let (mut hash_ms, mut up_ms, mut down_ms) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..args.runs {
        let path = dir.path().join(format!("f{run}"));
        write_file(&path, size, 1000 + u64::from(run))?;
        let t = Instant::now();
        let mut h = Sha256::new();
        let mut f = fs::File::open(&path)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        let sha: [u8; 32] = h.finalize().into();
        hash_ms.push(t.elapsed().as_secs_f64() * 1e3);

        let t = Instant::now();
        let c = &mut user.client;
        let state = c.upload_begin(room, "f.bin", size, "", sha).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let mut src = fs::File::open(&path)?;
        c.upload_bytes(&state, &mut src, &mut |_| {}).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let stored = c.upload_finish(state.upload, "").map_err(|e| anyhow::anyhow!("{e:?}"))?;
        up_ms.push(t.elapsed().as_secs_f64() * 1e3);

        let t = Instant::now();
        let mut sink = HashingSink(Sha256::new(), 0);
        let meta = c.download(stored.file, 0, &mut sink, &mut |_, _| {}).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        down_ms.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(meta.size == size && sink.1 == size, "short download");
        ensure!(<[u8; 32]>::from(sink.0.finalize()) == sha, "the download does not hash right");
        fs::remove_file(&path)?;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let out = serde_json::json!({
        "mib": args.mb,
        "runs": args.runs,
        "client_hash_ms": hash_ms,
        "upload_ms": up_ms,
        "download_ms": down_ms,
        "daemon_rss_idle_kib": idle_kib,
        "daemon_rss_peak_sampled_kib": peak.load(Ordering::Relaxed),
        "daemon_vmhwm_kib": status_kib(pid, "VmHWM:"),
    });
    println!("{out}");
    Ok(())
}

/// Hashes what a download writes, holding nothing.
struct HashingSink(Sha256, u64);

impl Write for HashingSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        self.1 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
