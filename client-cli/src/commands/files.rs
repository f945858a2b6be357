//! `upload`, `download` and `forward`: files shared in rooms.
//!
//! Neither side ever holds a whole file: `upload` hashes the file in one streaming pass, then
//! sends it chunk by chunk; `download` writes chunks to `PATH.part` as they come and renames it to
//! PATH once the whole file hashes right. Both resume: an upload's id is kept in the home
//! directory (`uploads/ROOM-SHA256`) until it is finished, so running the same upload again
//! continues where the server stands; a download continues from the length of `PATH.part`.
//! A progress bar goes to stderr, and only on a terminal.

use super::message::print_posted;
use crate::connect::{CallError, Ctx};
use anyhow::{anyhow, Context};
use chime_client::blocking::ClientError;
use chime_protocol::{ErrorCode, RoomId, Seq};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::fs::{self, File, OpenOptions};
use std::io::{self, IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A progress line on stderr, redrawn at most ten times a second; nothing when stderr is not a
/// terminal.
struct Progress {
    label: String,
    total: u64,
    on: bool,
    last: Option<Instant>,
}

impl Progress {
    fn new(label: &str, total: u64) -> Progress {
        Progress { label: label.into(), total, on: io::stderr().is_terminal(), last: None }
    }

    fn show(&mut self, done: u64) {
        if !self.on || self.last.is_some_and(|t| t.elapsed() < Duration::from_millis(100) && done < self.total) {
            return;
        }
        self.last = Some(Instant::now());
        let pct = (done * 100).checked_div(self.total).unwrap_or(100).min(100);
        let filled = (pct / 5) as usize;
        eprint!(
            "\r{} [{}{}] {pct:3}% {}/{} bytes",
            self.label,
            "#".repeat(filled),
            " ".repeat(20 - filled),
            done,
            self.total
        );
    }

    fn end(&self) {
        if self.on && self.last.is_some() {
            eprintln!();
        }
    }
}

/// The SHA-256 and length of a file, read in one streaming pass.
fn hash_file(path: &Path) -> io::Result<([u8; 32], u64)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hasher.finalize().into(), total))
}

/// Where an unfinished upload's id is kept.
fn upload_marker(ctx: &Ctx, room: u64, sha: &[u8; 32]) -> PathBuf {
    ctx.home.dir().join("uploads").join(format!("{room}-{}", hex::encode(sha)))
}

/// A media type guessed from the file name's extension (the server does not check it).
fn media_type(path: &Path) -> &'static str {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "txt" | "md" => "text/plain",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "pdf" => "application/pdf",
        "json" => "application/json",
        "zip" => "application/zip",
        _ => "application/octet-stream",
    }
}

/// `upload ROOM FILE [--caption TEXT]`.
pub fn upload(ctx: &mut Ctx, room: u64, path: &Path, caption: &str) -> Result<(), CallError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| CallError::Local(anyhow!("{} has no usable file name", path.display())))?
        .to_string();
    let (sha, size) =
        hash_file(path).with_context(|| format!("cannot read {}", path.display())).map_err(CallError::Local)?;
    let marker = upload_marker(ctx, room, &sha);
    let (mut client, _) = ctx.connect_authed()?;
    // An earlier run of the same upload that did not finish: continue it.
    let earlier = fs::read_to_string(&marker).ok().and_then(|s| s.trim().parse::<u64>().ok());
    let state = match earlier.map(|id| client.upload_resume(id)) {
        Some(Ok(state)) if state.size == size => state,
        Some(Err(ClientError::Server(e))) if e.code != ErrorCode::NOT_FOUND => {
            return Err(ClientError::Server(e).into())
        }
        _ => client.upload_begin(RoomId(room), &name, size, media_type(path), sha)?,
    };
    if let Some(dir) = marker.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(&marker, state.upload.to_string())?;
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(state.offset))?;
    let mut progress = Progress::new(&name, size);
    progress.show(state.offset);
    let sent = client.upload_bytes(&state, &mut file, &mut |at| progress.show(at));
    progress.end();
    sent?;
    let stored = match client.upload_finish(state.upload, caption) {
        Ok(stored) => stored,
        Err(ClientError::Server(e)) if e.code == ErrorCode::HASH_MISMATCH => {
            // The server discarded the bytes: the next run begins again.
            let _ = fs::remove_file(&marker);
            return Err(ClientError::Server(e).into());
        }
        Err(e) => return Err(e.into()),
    };
    let _ = fs::remove_file(&marker);
    let sha_hex = hex::encode(stored.sha256);
    ctx.out.record(
        &json!({"file": stored.file, "room": stored.room.get(), "seq": stored.seq.get(), "sha256": sha_hex}),
        &format!("shared {name} as file {} in room {} (seq {}), sha256 {sha_hex}", stored.file, room, stored.seq),
    )?;
    Ok(())
}

/// `PATH.part`.
fn part_of(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".part");
    PathBuf::from(s)
}

/// `download FILE [-o PATH]`: to PATH, or to the file's own name in the current directory.
pub fn download(ctx: &mut Ctx, file: u64, out: Option<&Path>) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    // Without -o the name is known from the metadata, which comes before any chunk.
    let target: RefCell<Option<PathBuf>> = RefCell::new(out.map(Path::to_path_buf));
    let offset = out.map(part_of).and_then(|p| fs::metadata(p).ok()).map_or(0, |m| m.len());
    let mut progress: Option<Progress> = None;
    let mut writer = LazyFile { sink: None, target: &target, append: offset > 0, error: None };
    let meta = client.download(file, offset, &mut writer, &mut |meta, at| {
        if target.borrow().is_none() {
            let name =
                Path::new(&meta.name).file_name().map_or_else(|| format!("file-{}", meta.file).into(), PathBuf::from);
            *target.borrow_mut() = Some(name);
        }
        progress.get_or_insert_with(|| Progress::new(&meta.name, meta.size)).show(at)
    });
    if let Some(p) = &progress {
        p.end();
    }
    if let Some(e) = writer.error.take() {
        return Err(CallError::Local(anyhow!(e)));
    }
    let meta = match meta {
        Err(ClientError::Server(e)) if e.code == ErrorCode::INVALID_ARGUMENT && offset > 0 => {
            return Err(CallError::Local(anyhow!(
                "the partial download is longer than the file; remove it to download again ({})",
                e.message
            )))
        }
        other => other?,
    };
    let wrote = writer.sink.take().is_some();
    drop(writer);
    let path = target.into_inner().unwrap_or_else(|| PathBuf::from(&meta.name));
    let part = part_of(&path);
    if !wrote {
        // Nothing came (the part held the whole file already, or the file is empty).
        OpenOptions::new().create(true).append(true).open(&part)?;
    }
    let (sha, len) = hash_file(&part)?;
    if len != meta.size || sha != meta.sha256 {
        let _ = fs::remove_file(&part);
        return Err(CallError::Local(anyhow!(
            "the download does not hash to {} ({} of {} bytes); it was removed, download again",
            hex::encode(meta.sha256),
            len,
            meta.size
        )));
    }
    fs::rename(&part, &path)?;
    let sha_hex = hex::encode(sha);
    ctx.out.record(
        &json!({"file": meta.file, "path": path.display().to_string(), "sha256": sha_hex}),
        &format!("saved file {} to {} ({} bytes, sha256 {sha_hex})", meta.file, path.display(), meta.size),
    )?;
    Ok(())
}

/// The `.part` file, opened with the first chunk (appending when resuming, else from empty).
struct LazyFile<'a> {
    sink: Option<File>,
    target: &'a RefCell<Option<PathBuf>>,
    append: bool,
    error: Option<io::Error>,
}

impl Write for LazyFile<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.sink.is_none() {
            let path = self.target.borrow().clone().ok_or_else(|| io::Error::other("no output path"))?;
            let part = part_of(&path);
            let mut options = OpenOptions::new();
            options.create(true);
            if self.append {
                options.append(true);
            } else {
                options.write(true).truncate(true);
            }
            match options.open(&part) {
                Ok(f) => self.sink = Some(f),
                Err(e) => {
                    let message = format!("cannot write {}: {e}", part.display());
                    self.error = Some(io::Error::other(message.clone()));
                    return Err(io::Error::other(message));
                }
            }
        }
        match self.sink.as_mut() {
            Some(f) => f.write(buf),
            None => Err(io::Error::other("no output file")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.sink.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

/// `forward ROOM SEQ TO_ROOM`.
pub fn forward(ctx: &mut Ctx, room: u64, seq: u64, to_room: u64) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    let posted = client.forward(RoomId(room), Seq(seq), RoomId(to_room))?;
    print_posted(ctx, &posted, "forwarded to")
}
