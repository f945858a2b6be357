//! The content store's background work, on its own thread (never a caller's, never the event
//! loop's):
//!
//! - **Eviction**: when the cache is over its quota, the least recently used content goes to
//!   nodes until the cache is 5% under quota. For each: put on nodes chosen by
//!   [`Nodes::choose`](crate::node::Nodes::choose) until `copies` verified copies exist, record
//!   each placement (fsynced) right after its node said STORED, then delete the local file.
//!   Content read while it was being put stays cached (its placements make a later eviction a
//!   mere unlink).
//! - **Reconciliation** (at start, and in every rebalance): each reachable node's LIST is
//!   compared with the placements recorded for it. A record whose object is missing (or of
//!   another size) is dropped; an object with no record is adopted (recorded), unless its
//!   content was forgotten, in which case it is deleted. Only after this are recorded placements
//!   counted towards `copies` (until then, eviction STATs them first).
//! - **Rebalance** (every `rebalance_interval_secs`, hourly by default, and on demand): also
//!   moves out cached content not read since the previous rebalance, restores `copies` for
//!   content with too few, finishes forgets that a down node delayed, and moves objects off
//!   nodes whose free space fell under 5% of their filesystem (to other nodes, or back into the
//!   cache when no node has room and the cache does).
//! - **On demand**: `chimed admin rebalance` drops `rebalance.request` (a token) into the cache
//!   directory; this thread looks for it every second, runs a rebalance and writes the report to
//!   `rebalance.TOKEN.json`. When no daemon holds the cache, the admin command opens the store
//!   itself and runs the rebalance in its own process (see [`request_rebalance`]).

use super::{lock, CrashPoint, Inner};
use crate::node::{NodeLink, Sha256};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The trigger file of an on-demand rebalance.
pub const REQUEST_FILE: &str = "rebalance.request";

/// What a rebalance did.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct RebalanceReport {
    /// Placements confirmed by the nodes' listings.
    pub confirmed: u64,
    /// Placement records dropped: the node does not have the object.
    pub dropped: u64,
    /// Objects found on nodes without a record, now recorded.
    pub adopted: u64,
    /// Node copies of forgotten content deleted.
    pub deleted: u64,
    /// Cached content not read since the previous rebalance, moved to nodes.
    pub moved_out: u64,
    /// Content evicted because the cache was over quota.
    pub evicted: u64,
    /// Copies added to reach `copies`.
    pub replicated: u64,
    /// Objects moved off nodes short of space to other nodes.
    pub moved_between_nodes: u64,
    /// Objects pulled back into the cache from nodes short of space.
    pub pulled_back: u64,
    /// Nodes that could not be asked.
    pub unreachable: Vec<String>,
    /// Other problems, one line each.
    pub errors: Vec<String>,
}

/// The background thread: wakes every second (or when kicked), persists last uses, evicts over
/// quota, and rebalances when due or asked.
pub(super) fn run(inner: &Inner) {
    let mut next_rebalance = Instant::now() + lock(&inner.signal).rebalance_every;
    let mut reconciled = inner.nodes.is_empty();
    let mut evict_after = Instant::now();
    let mut reconcile_after = Instant::now();
    loop {
        {
            let signal = lock(&inner.signal);
            let (mut signal, _) = inner
                .wake
                .wait_timeout_while(signal, Duration::from_secs(1), |s| !s.stop && !s.kick)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if signal.stop {
                drop(signal);
                flush_touches(inner);
                return;
            }
            signal.kick = false;
            next_rebalance = next_rebalance.min(Instant::now() + signal.rebalance_every);
        }
        flush_touches(inner);
        // Until every node has been compared with its records once; a down node is retried
        // each minute, not each second (the others are listed whole every time).
        if !reconciled && Instant::now() >= reconcile_after {
            let mut report = RebalanceReport::default();
            reconcile(inner, &mut report);
            reconciled = report.unreachable.is_empty();
            reconcile_after = Instant::now() + Duration::from_secs(60);
        }
        let requested = take_request(&inner.dir);
        if requested.is_some() || Instant::now() >= next_rebalance {
            let report = rebalance(inner);
            if let Some(token) = requested {
                if let Err(e) = write_report(&inner.dir, &token, &report) {
                    log::warn!("content: cannot write the rebalance report: {e}");
                }
            }
            next_rebalance = Instant::now() + lock(&inner.signal).rebalance_every;
        }
        // When no node took anything (down or full), try again in a while rather than every
        // second; the cache keeps everything meanwhile.
        if Instant::now() >= evict_after && over_quota(inner) && evict(inner) == 0 && over_quota(inner) {
            evict_after = Instant::now() + Duration::from_secs(10);
        }
    }
}

fn over_quota(inner: &Inner) -> bool {
    !inner.nodes.is_empty() && lock(&inner.lru).bytes() > inner.quota
}

fn flush_touches(inner: &Inner) {
    let dirty = lock(&inner.lru).take_dirty();
    if !dirty.is_empty() {
        if let Err(e) = lock(&inner.index).touch(&dirty) {
            log::warn!("content: cannot record last uses: {e}");
        }
    }
}

/// Evicts least recently used content until the cache is 5% under quota; returns how many
/// objects left the cache.
pub(super) fn evict(inner: &Inner) -> usize {
    if inner.nodes.is_empty() {
        return 0;
    }
    let target = inner.quota - inner.quota / 20;
    let _one_at_a_time = lock(&inner.evicting);
    if lock(&inner.lru).bytes() <= inner.quota {
        return 0;
    }
    inner.nodes.refresh();
    let mut evicted = 0;
    let mut skipped: HashSet<Sha256> = HashSet::new();
    while lock(&inner.lru).bytes() > target && !inner.stopping() {
        let next = lock(&inner.lru).oldest(skipped.len() + 1).into_iter().find(|(sha, _, _)| !skipped.contains(sha));
        let Some((sha, size, tick)) = next else { break };
        match move_out(inner, sha, size, tick) {
            Ok(true) => evicted += 1,
            Ok(false) => {
                skipped.insert(sha);
            }
            Err(e) => {
                log::warn!("content {sha}: cannot move to a node: {e}");
                skipped.insert(sha);
                // Nothing fits anywhere: the next ones would fail the same way.
                if e.contains("no node") {
                    break;
                }
            }
        }
    }
    if evicted > 0 {
        log::info!("content: moved {evicted} objects to nodes; cache now {} bytes", lock(&inner.lru).bytes());
    }
    evicted
}

/// Puts cached `sha` on `copies` nodes, then deletes it locally, unless it was used since
/// `tick` or forgotten meanwhile. `Ok(true)` when it left the cache.
fn move_out(inner: &Inner, sha: Sha256, size: u64, tick: u64) -> Result<bool, String> {
    let path = inner.object_path(sha);
    ensure_copies(inner, sha, &path, size)?;
    let _guard = inner.lock(sha);
    if lock(&inner.lru).tick(sha) != Some(tick) {
        return Ok(false);
    }
    inner.crash_point(CrashPoint::AfterRecord);
    // The placements are durable: the local copy may go. A crash between the unlink and the
    // index update is corrected by the scan at open.
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("removing {}: {e}", path.display())),
    }
    lock(&inner.lru).remove(sha);
    lock(&inner.index).set_uncached(sha).map_err(|e| e.to_string())?;
    Ok(true)
}

/// Makes sure `copies` nodes hold a verified, recorded copy of `sha`, putting the local file at
/// `path` where needed. Returns the number of confirmed copies.
fn ensure_copies(inner: &Inner, sha: Sha256, path: &Path, size: u64) -> Result<usize, String> {
    let copies = inner.nodes.copies();
    let placements = lock(&inner.index).placements(sha).map_err(|e| e.to_string())?;
    let mut holding: Vec<String> = Vec::new();
    let mut confirmed = 0;
    for p in placements {
        let known = lock(&inner.confirmed).contains(&(sha, p.node.clone()));
        if known {
            confirmed += 1;
            holding.push(p.node);
            continue;
        }
        // Recorded by an earlier run: believed only once the node says so.
        let Some(link) = inner.nodes.get(&p.node) else { continue };
        match link.stat(sha) {
            Ok(Some(n)) if n == size => {
                lock(&inner.confirmed).insert((sha, p.node.clone()));
                confirmed += 1;
                holding.push(p.node);
            }
            Ok(_) => {
                log::warn!("content {sha}: node {} has no good copy although one was recorded; record dropped", p.node);
                let _ = lock(&inner.index).remove_placement(sha, &p.node);
            }
            // Unknown for now: not counted, and not chosen again either.
            Err(_) => holding.push(p.node),
        }
    }
    let mut last_error = String::new();
    while confirmed < copies {
        let exclude: Vec<&str> = holding.iter().map(String::as_str).collect();
        let candidates: Vec<NodeLink> = inner.nodes.choose(size, &exclude).into_iter().cloned().collect();
        if candidates.is_empty() {
            return Err(format!(
                "no node has room for {size} bytes ({confirmed} of {copies} copies){}",
                if last_error.is_empty() { String::new() } else { format!("; last error: {last_error}") }
            ));
        }
        let mut placed = false;
        for link in candidates {
            match link.put(path, sha, size) {
                Ok(_) => {
                    inner.crash_point(CrashPoint::AfterPut);
                    let _guard = inner.lock(sha);
                    let live = lock(&inner.index).object(sha).ok().flatten().is_some_and(|o| !o.forgotten);
                    if !live {
                        // Forgotten while it was being put: the copy is garbage.
                        let _ = link.delete(sha);
                        return Err("forgotten meanwhile".into());
                    }
                    lock(&inner.index).add_placement(sha, link.name(), size).map_err(|e| e.to_string())?;
                    lock(&inner.confirmed).insert((sha, link.name().to_owned()));
                    holding.push(link.name().to_owned());
                    confirmed += 1;
                    placed = true;
                    break;
                }
                Err(e) => {
                    log::warn!("content {sha}: put on node {} failed: {e}", link.name());
                    last_error = e.to_string();
                    holding.push(link.name().to_owned());
                }
            }
        }
        if !placed && !last_error.is_empty() && holding.len() >= inner.nodes.links().len() {
            return Err(format!("no node took it ({confirmed} of {copies} copies): {last_error}"));
        }
    }
    Ok(confirmed)
}

/// Compares every reachable node's listing with the recorded placements (see the module doc).
fn reconcile(inner: &Inner, report: &mut RebalanceReport) {
    for link in inner.nodes.links() {
        let mut listed: Vec<(Sha256, u64)> = Vec::new();
        let mut after = None;
        let listing = loop {
            match link.list(after, 1024) {
                Ok(page) => {
                    after = page.entries.last().map(|e| e.sha256);
                    listed.extend(page.entries.iter().map(|e| (e.sha256, e.size)));
                    if !page.more || page.entries.is_empty() {
                        break Ok(());
                    }
                }
                Err(e) => break Err(e),
            }
        };
        if let Err(e) = listing {
            log::warn!("content: cannot list node {}: {e}", link.name());
            report.unreachable.push(link.name().to_owned());
            continue;
        }
        let node = link.name().to_owned();
        let on_node: HashMap<Sha256, u64> = listed.into_iter().collect();
        let recorded = lock(&inner.index).placements_on(&node).unwrap_or_default();
        let recorded_set: HashSet<Sha256> = recorded.iter().map(|r| r.0).collect();
        for (sha, size) in recorded {
            if on_node.get(&sha) == Some(&size) {
                lock(&inner.confirmed).insert((sha, node.clone()));
                report.confirmed += 1;
            } else {
                log::warn!("content {sha}: recorded on node {node} but not there; record dropped");
                let _ = lock(&inner.index).remove_placement(sha, &node);
                lock(&inner.confirmed).remove(&(sha, node.clone()));
                report.dropped += 1;
            }
        }
        for (sha, size) in on_node {
            if recorded_set.contains(&sha) {
                continue;
            }
            let _guard = inner.lock(sha);
            let object = lock(&inner.index).object(sha).ok().flatten();
            if object.as_ref().is_some_and(|o| o.forgotten) {
                if link.delete(sha).is_ok() {
                    report.deleted += 1;
                }
                continue;
            }
            // A verified object with no record: a put whose record a crash prevented, or an
            // index that was lost. Recording it can only keep content, never lose it.
            if lock(&inner.index).add_placement(sha, &node, size).is_ok() {
                lock(&inner.confirmed).insert((sha, node.clone()));
                report.adopted += 1;
            }
        }
    }
    // Forgets that a down node delayed.
    let forgotten: Vec<Sha256> =
        lock(&inner.index).objects().unwrap_or_default().into_iter().filter(|o| o.forgotten).map(|o| o.sha).collect();
    for sha in forgotten {
        let _guard = inner.lock(sha);
        if lock(&inner.index).object(sha).ok().flatten().is_some_and(|o| o.forgotten) {
            let before = lock(&inner.index).placements(sha).map(|p| p.len()).unwrap_or(0);
            inner.delete_placements(sha);
            let after = lock(&inner.index).placements(sha).map(|p| p.len()).unwrap_or(0);
            report.deleted += before.saturating_sub(after) as u64;
        }
    }
}

/// A rebalance on the caller's thread; "cold" means not used since the previous rebalance (or
/// since the store opened).
pub(super) fn rebalance(inner: &Inner) -> RebalanceReport {
    let _one_at_a_time = lock(&inner.rebalancing);
    let mut report = RebalanceReport::default();
    if inner.nodes.is_empty() {
        return report;
    }
    let started = Instant::now();
    reconcile(inner, &mut report);
    inner.nodes.refresh();
    // 1. Cold content out: not read since the previous rebalance.
    let now = lock(&inner.lru).now();
    let mark = std::mem::replace(&mut *lock(&inner.cold_mark), now);
    if let Err(e) = lock(&inner.index).set_cold_mark(now) {
        report.errors.push(format!("recording the rebalance: {e}"));
    }
    let cold: Vec<(Sha256, u64, u64)> =
        lock(&inner.lru).oldest(usize::MAX).into_iter().filter(|&(_, _, tick)| tick < mark).collect();
    for (sha, size, tick) in cold {
        match move_out(inner, sha, size, tick) {
            Ok(true) => report.moved_out += 1,
            Ok(false) => {}
            Err(e) => {
                report.errors.push(format!("moving {sha} out: {e}"));
                if e.contains("no node") {
                    break;
                }
            }
        }
    }
    // 2. Too few copies (a node lost one, or `copies` was raised).
    let copies = inner.nodes.copies();
    let uncached: Vec<(Sha256, u64)> = lock(&inner.index)
        .objects()
        .unwrap_or_default()
        .into_iter()
        .filter(|o| !o.forgotten && !o.cached)
        .map(|o| (o.sha, o.size))
        .collect();
    for (sha, size) in uncached {
        let have = lock(&inner.index).placements(sha).map(|p| p.len()).unwrap_or(0);
        if have == 0 || have >= copies {
            continue;
        }
        match with_local_copy(inner, sha, |path| ensure_copies(inner, sha, path, size)) {
            Ok(n) => report.replicated += n.saturating_sub(have) as u64,
            Err(e) => report.errors.push(format!("replicating {sha}: {e}")),
        }
    }
    // 3. Nodes short of space.
    drain_short_nodes(inner, &mut report);
    // 4. And the quota.
    report.evicted += evict(inner) as u64;
    log::info!("content: rebalance done in {:.1}s: {report:?}", started.elapsed().as_secs_f64());
    report
}

/// Free space under which a node is short: 5% of its filesystem.
fn short_reserve(total: u64) -> u64 {
    total / 20
}

fn drain_short_nodes(inner: &Inner, report: &mut RebalanceReport) {
    for link in inner.nodes.links() {
        let Some(space) = link.last_space() else { continue };
        let reserve = short_reserve(space.total);
        if space.free >= reserve {
            continue;
        }
        let node = link.name().to_owned();
        let mut need = reserve - space.free;
        let mut on_node = lock(&inner.index).placements_on(&node).unwrap_or_default();
        // The biggest first: fewest moves for the space.
        on_node.sort_by_key(|entry| std::cmp::Reverse(entry.1));
        for (sha, size) in on_node {
            if need == 0 {
                break;
            }
            let holders: Vec<String> =
                lock(&inner.index).placements(sha).unwrap_or_default().into_iter().map(|p| p.node).collect();
            let exclude: Vec<&str> = holders.iter().map(String::as_str).collect();
            let target = inner.nodes.choose(size, &exclude).into_iter().next().cloned();
            let moved = with_local_copy(inner, sha, |path| match &target {
                Some(target) => target.put(path, sha, size).map_err(|e| e.to_string()).and_then(|_| {
                    let _guard = inner.lock(sha);
                    lock(&inner.index).add_placement(sha, target.name(), size).map_err(|e| e.to_string())?;
                    lock(&inner.confirmed).insert((sha, target.name().to_owned()));
                    Ok(false)
                }),
                None if lock(&inner.lru).bytes() + size <= inner.quota => {
                    let copy = inner.temp_path(sha);
                    fs::copy(path, &copy).map_err(|e| e.to_string())?;
                    let _guard = inner.lock(sha);
                    inner.move_in(&copy, sha).map_err(|e| e.to_string())?;
                    Ok(true)
                }
                None => Err("no other node and no room in the cache".into()),
            });
            match moved {
                Ok(pulled) => {
                    let _guard = inner.lock(sha);
                    if link.delete(sha).is_ok() {
                        let _ = lock(&inner.index).remove_placement(sha, &node);
                        lock(&inner.confirmed).remove(&(sha, node.clone()));
                        need = need.saturating_sub(size);
                        if pulled {
                            report.pulled_back += 1;
                        } else {
                            report.moved_between_nodes += 1;
                        }
                    }
                }
                Err(e) => {
                    report.errors.push(format!("moving {sha} off short node {node}: {e}"));
                    break;
                }
            }
        }
    }
}

/// Runs `f` with a local file holding `sha`: the cached one, or a temp copy fetched from a node
/// (removed afterwards).
fn with_local_copy<T>(inner: &Inner, sha: Sha256, f: impl FnOnce(&Path) -> Result<T, String>) -> Result<T, String> {
    let cached = inner.object_path(sha);
    if cached.exists() {
        return f(&cached);
    }
    let links = inner.holders(sha).map_err(|e| e.to_string())?;
    let temp = inner.temp_path(sha);
    let file = fs::File::create(&temp).map_err(|e| e.to_string())?;
    let fetch = super::fetch::Fetch::default();
    let (outcome, _) = super::fetch::run(&fetch, sha, &links, file);
    let result = match outcome {
        super::fetch::Outcome::Done => f(&temp),
        super::fetch::Outcome::Failed { reason, .. } => Err(reason),
    };
    let _ = fs::remove_file(&temp);
    result
}

fn take_request(dir: &Path) -> Option<String> {
    let path = dir.join(REQUEST_FILE);
    let token = fs::read_to_string(&path).ok()?;
    let _ = fs::remove_file(&path);
    let token = token.trim().to_owned();
    (!token.is_empty() && token.bytes().all(|b| b.is_ascii_alphanumeric())).then_some(token)
}

fn report_path(dir: &Path, token: &str) -> PathBuf {
    dir.join(format!("rebalance.{token}.json"))
}

fn write_report(dir: &Path, token: &str, report: &RebalanceReport) -> io::Result<()> {
    let temp = dir.join(format!("rebalance.{token}.tmp"));
    fs::write(&temp, serde_json::to_vec(report).map_err(io::Error::other)?)?;
    fs::rename(&temp, report_path(dir, token))
}

/// Asks the daemon that has the cache at `dir` open for a rebalance and waits up to `timeout`
/// for its report.
pub fn request_rebalance(dir: &Path, timeout: Duration) -> io::Result<RebalanceReport> {
    let token = format!("{:016x}", rand::random::<u64>());
    let temp = dir.join(format!("rebalance.{token}.req"));
    fs::write(&temp, &token)?;
    fs::rename(&temp, dir.join(REQUEST_FILE))?;
    let answer = report_path(dir, &token);
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(bytes) = fs::read(&answer) {
            let _ = fs::remove_file(&answer);
            return serde_json::from_slice(&bytes).map_err(io::Error::other);
        }
        if Instant::now() >= deadline {
            let _ = fs::remove_file(dir.join(REQUEST_FILE));
            return Err(io::Error::new(io::ErrorKind::TimedOut, "the daemon did not answer the rebalance request"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
