//! The push-notification path: a notification waits a short delay and is cancelled if its user
//! reads the message first; when due, a [`Gateway`] takes it.
//!
//! Who is notified is decided on the worker that committed the message
//! ([`chime_storage::SharedStore::push_targets`]: the members it mentions, the other user of a
//! direct dialog, unless their level for the room is `none` or they muted it). The worker hands
//! each one to the [`Notifier`] without waiting (a bounded channel; a full one drops the
//! notification and counts it, as a notification is worth less than a commit's latency). A
//! RECEIPT that reads up to or past a queued message's seq, on any of the user's devices, cancels
//! it. The notifier's own thread keeps the queue in memory, sleeps until the next one is due and
//! hands it to the gateway: neither the event loop nor a worker ever waits for a gateway.
//!
//! The queue lives in memory: a restart forgets what was queued (the mentions themselves are in
//! the store, and NOTIFICATIONS shows them at the next login). A notification carries no message
//! text: the device fetches the message over its own authenticated connection, so nothing a
//! message says (a secret room's least of all) lands in a spool file.
//!
//! [`SpoolGateway`], the one gateway built in, appends one JSON line per notification to a file:
//! the hook a real push gateway (APNs, FCM, a web-push relay) tails, as documented in
//! docs/operations.md.

use chime_storage::{PushReason, RoomId, Seq, UserId};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Notifications waiting at most; past it new ones are dropped (and counted).
const MAX_PENDING: usize = 100_000;
/// Events the channel holds before a sender drops one.
const CHANNEL: usize = 65_536;

/// One notification for a gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushNotification {
    /// Who to notify.
    pub user: UserId,
    /// Their name.
    pub user_name: String,
    /// The room.
    pub room: RoomId,
    /// The message.
    pub seq: Seq,
    /// Who wrote it.
    pub author: String,
    /// When it was committed, Unix ms.
    pub ts_ms: i64,
    /// Why the user is notified.
    pub reason: PushReason,
}

impl PushNotification {
    /// The notification as one JSON object (what the spool holds per line).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "user": self.user_name,
            "user_id": self.user,
            "room": self.room,
            "seq": self.seq,
            "author": self.author,
            "ts_ms": self.ts_ms,
            "reason": match self.reason {
                PushReason::Mention => "mention",
                PushReason::Direct => "direct",
            },
        })
    }
}

/// Where due notifications go. Runs on the notifier's thread only, so it may block.
pub trait Gateway: Send {
    /// Delivers one notification; an error is logged and the notification dropped.
    fn deliver(&mut self, n: &PushNotification) -> std::io::Result<()>;
}

/// A gateway that appends one JSON line per notification to a file (created 0600), flushed per
/// line so a reader tailing it sees each one at once.
pub struct SpoolGateway {
    /// Where.
    path: PathBuf,
    /// The file, opened for appending.
    file: std::fs::File,
}

impl SpoolGateway {
    /// Opens (creating) the spool file for appending.
    pub fn open(path: &Path) -> std::io::Result<SpoolGateway> {
        let mut options = std::fs::OpenOptions::new();
        options.append(true).create(true);
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        Ok(SpoolGateway { path: path.to_path_buf(), file: options.open(path)? })
    }
}

impl Gateway for SpoolGateway {
    fn deliver(&mut self, n: &PushNotification) -> std::io::Result<()> {
        let mut line = n.to_json().to_string();
        line.push('\n');
        // One write per line: with O_APPEND, lines of concurrent writers never interleave.
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))
    }
}

/// What reaches the notifier's thread.
enum Event {
    /// Queue a notification.
    Queue(PushNotification),
    /// `user` read `room` up to `seq`: cancel what is queued for it at or below.
    Read { user: UserId, room: RoomId, seq: Seq },
}

/// The handle workers queue notifications and reads through. Cheap to clone; the thread ends when
/// every handle is dropped.
#[derive(Clone)]
pub struct Notifier {
    /// To the thread.
    tx: Sender<Event>,
    /// Notifications dropped because the channel or the queue was full.
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier").field("dropped", &self.dropped.load(Ordering::Relaxed)).finish_non_exhaustive()
    }
}

impl Notifier {
    /// Starts the notifier's thread: notifications wait `delay`, then go to `gateway`.
    pub fn start(delay: Duration, gateway: Box<dyn Gateway>) -> std::io::Result<Notifier> {
        let (tx, rx) = crossbeam_channel::bounded(CHANNEL);
        let dropped = Arc::new(AtomicU64::new(0));
        let counted = dropped.clone();
        std::thread::Builder::new().name("chimed-notify".into()).spawn(move || run(&rx, delay, gateway, &counted))?;
        Ok(Notifier { tx, dropped })
    }

    /// Queues a notification; never waits.
    pub fn queue(&self, n: PushNotification) {
        self.send(Event::Queue(n));
    }

    /// Cancels what is queued for `user` in `room` up to `seq` (they read it); never waits.
    pub fn read(&self, user: UserId, room: RoomId, seq: Seq) {
        self.send(Event::Read { user, room, seq });
    }

    fn send(&self, event: Event) {
        match self.tx.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// The notifier's thread: the queue by due time, cancelled by reads, drained into the gateway.
fn run(rx: &Receiver<Event>, delay: Duration, mut gateway: Box<dyn Gateway>, dropped: &AtomicU64) {
    let mut queue = Queue::default();
    loop {
        let event = match queue.next_due() {
            Some(due) => match rx.recv_timeout(due.saturating_duration_since(Instant::now())) {
                Ok(event) => Some(event),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            },
            None => match rx.recv() {
                Ok(event) => Some(event),
                Err(_) => return,
            },
        };
        let now = Instant::now();
        match event {
            Some(Event::Queue(n)) => {
                let queued = queue.push(now + delay, n);
                dropped.fetch_add(u64::from(!queued), Ordering::Relaxed);
            }
            Some(Event::Read { user, room, seq }) => queue.cancel(user, room, seq),
            None => {}
        }
        for n in queue.take_due(now) {
            if let Err(e) = gateway.deliver(&n) {
                log::warn!("push gateway: dropped a notification for user {}: {e}", n.user);
            }
        }
    }
}

/// Queued notifications by due time (then arrival), with the keys a read cancels by.
#[derive(Default)]
struct Queue {
    /// (due, arrival number) -> notification.
    by_due: BTreeMap<(Instant, u64), PushNotification>,
    /// Arrivals so far (ties of due time keep arrival order).
    arrivals: u64,
}

impl Queue {
    /// Adds one; false when the queue is full.
    fn push(&mut self, due: Instant, n: PushNotification) -> bool {
        if self.by_due.len() >= MAX_PENDING {
            return false;
        }
        self.arrivals += 1;
        self.by_due.insert((due, self.arrivals), n);
        true
    }

    fn next_due(&self) -> Option<Instant> {
        self.by_due.keys().next().map(|(due, _)| *due)
    }

    /// Drops what `user` has queued in `room` at or below `seq`. A scan: reads are rarer than the
    /// queue is long only in a storm, and the queue is bounded.
    fn cancel(&mut self, user: UserId, room: RoomId, seq: Seq) {
        self.by_due.retain(|_, n| !(n.user == user && n.room == room && n.seq <= seq));
    }

    /// Removes and returns what is due at `now`, in due order.
    fn take_due(&mut self, now: Instant) -> Vec<PushNotification> {
        let later = self.by_due.split_off(&(now, u64::MAX));
        std::mem::replace(&mut self.by_due, later).into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn note(user: u64, room: u64, seq: u64) -> PushNotification {
        PushNotification {
            user: UserId(user),
            user_name: format!("u{user}"),
            room: RoomId(room),
            seq: Seq(seq),
            author: "ann".into(),
            ts_ms: 1,
            reason: PushReason::Mention,
        }
    }

    #[test]
    fn due_in_order_and_reads_cancel_up_to_their_seq() {
        let t0 = Instant::now();
        let mut q = Queue::default();
        q.push(t0 + Duration::from_millis(10), note(1, 5, 3));
        q.push(t0 + Duration::from_millis(20), note(1, 5, 4));
        q.push(t0 + Duration::from_millis(20), note(2, 5, 4));
        q.push(t0 + Duration::from_millis(30), note(1, 6, 2));
        assert!(q.take_due(t0).is_empty());
        q.cancel(UserId(1), RoomId(5), Seq(3));
        assert_eq!(q.next_due(), Some(t0 + Duration::from_millis(20)));
        let due = q.take_due(t0 + Duration::from_millis(25));
        assert_eq!(due.iter().map(|n| (n.user.get(), n.seq.get())).collect::<Vec<_>>(), [(1, 4), (2, 4)]);
        assert_eq!(q.take_due(t0 + Duration::from_secs(1)).len(), 1);
    }

    struct Collect(Arc<Mutex<Vec<PushNotification>>>);
    impl Gateway for Collect {
        fn deliver(&mut self, n: &PushNotification) -> std::io::Result<()> {
            self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.push(n.clone());
            Ok(())
        }
    }

    #[test]
    fn the_thread_delivers_after_the_delay_unless_read() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let notifier = Notifier::start(Duration::from_millis(50), Box::new(Collect(got.clone()))).unwrap();
        notifier.queue(note(1, 5, 3));
        notifier.queue(note(2, 5, 3));
        notifier.read(UserId(2), RoomId(5), Seq(7));
        std::thread::sleep(Duration::from_millis(20));
        assert!(got.lock().unwrap().is_empty(), "not before the delay");
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.lock().unwrap().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(got.lock().unwrap().iter().map(|n| n.user.get()).collect::<Vec<_>>(), [1]);
    }
}
