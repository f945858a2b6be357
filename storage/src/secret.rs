//! Secret rooms: message text sealed with a key per message that lives outside the database, so
//! that deleting a message destroys its text on either store, for real.
//!
//! Why keys and not scrubbing: PostgreSQL keeps what a transaction overwrote in dead tuples until
//! a vacuum, in its WAL until a checkpoint recycles the segment (and in archives and replicas for
//! ever), and in index pages; SQLite keeps it in WAL frames and freed pages. None of that can be
//! scrubbed from the daemon. So the text of a secret room never enters the database in clear: a
//! message, its edits and its current-state copy are stored as ChaCha20-Poly1305 ciphertext under
//! the message's own key, and the key sits in a slot of a small file beside the database (the
//! [`KeyFile`], in the daemon's data directory). Deleting the message overwrites its slot with
//! zeros and fsyncs: every copy of the ciphertext the database still holds, wherever it is, no
//! longer opens. Only the `DELETE` delta (the tombstone) and what was never text (author, times,
//! reactions) remain. A reply is a message of its own, with its own key.
//!
//! [`SecretStore`] wraps either store and does this for rooms of kind [`RoomKind::SECRET`]:
//! posts, edits and replies are sealed before they reach the inner store; every read that returns
//! text (log pages, SYNC, RESTORE, VIEW, mentions, the deltas a write returns for publishing) is
//! opened on the way out; what no longer opens reads as a tombstone (empty text, or no text for a
//! message in its current state). A sealed body names its key slot, so nothing maps messages to
//! slots but the ciphertext itself; the room id and slot are the AEAD's associated data, so a body
//! copied to another room or slot does not open, and a slot reused after a delete holds a key the
//! old ciphertext fails under.
//!
//! The cipher: ChaCha20-Poly1305 from `ring`, already in the tree through rustls (maintained,
//! constant-time, no new crate to vet). Its nonce is 96 bits, random per sealing: a key seals one
//! message and its edits, a handful of texts, so a repeated nonce is out of reach.
//!
//! Durability: the key of a post is written and fsynced before the post's transaction starts, so
//! an acknowledged message always has its key. A post that does not commit leaves a slot that is
//! freed again at once (or, after a crash, a slot whose key seals nothing, which costs 32 bytes).
//! A delete destroys the key right after its transaction commits (never before: an unauthorised
//! delete must not destroy anything); a crash in between leaves the key until the client's retry of
//! the unacknowledged delete, which finds the message deleted and destroys the key then.
//!
//! In the file, slots are overwritten in place; on a copy-on-write filesystem (btrfs, ZFS) or with
//! snapshots the old block may survive on the device. docs/architecture.md says so.

use crate::{
    ActionOutcome, DeltaRecord, MentionRecord, MessageAction, MessageRecord, NewAction, NewPost, PostOutcome,
    RecordKind, Result, RoomId, RoomKind, StoreError,
};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Bytes per slot: one 256-bit key. A free slot is all zeros.
const SLOT: u64 = 32;
/// Slot 0 is the file's header: this magic, zero-padded.
const MAGIC: &[u8] = b"chime secret keys v1";
/// What a sealed body starts with (then the slot, `:`, and hex of nonce, ciphertext and tag).
const SEALED: &str = "sealed:";

/// A key slot in the [`KeyFile`].
pub type Slot = u64;

/// The file of per-message keys, shared by every store of a daemon (one mutex; a key write is a
/// 32-byte `pwrite` and an fsync).
pub struct KeyFile {
    /// Where it is (for errors).
    path: PathBuf,
    /// The open file and its free slots.
    inner: Mutex<Slots>,
    /// Random keys and nonces.
    rng: SystemRandom,
}

/// The file and which of its slots are free.
struct Slots {
    /// The open file (read and write).
    file: File,
    /// Slots that hold zeros, lowest first, so the file stays as small as it can.
    free: BTreeSet<Slot>,
    /// The number of slots in the file, header included.
    len: Slot,
}

impl std::fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyFile").field("path", &self.path).finish_non_exhaustive()
    }
}

/// A shared [`KeyFile`] as [`crate::OpenOptions`] carries it: equal when it is the same file.
#[derive(Debug, Clone)]
pub struct SecretKeys(pub Arc<KeyFile>);

impl PartialEq for SecretKeys {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
impl Eq for SecretKeys {}

fn io(path: &Path, what: &str, e: &std::io::Error) -> StoreError {
    StoreError::Unavailable(format!("secret key file {}: {what}: {e}", path.display()))
}

impl KeyFile {
    /// Opens (creating, private to the owner) the key file at `path` and finds its free slots.
    pub fn open(path: &Path) -> Result<Arc<KeyFile>> {
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(true).create(true);
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(path).map_err(|e| io(path, "open", &e))?;
        let size = file.metadata().map_err(|e| io(path, "stat", &e))?.len();
        let mut header = [0u8; SLOT as usize];
        header[..MAGIC.len()].copy_from_slice(MAGIC);
        if size == 0 {
            file.write_all_at(&header, 0).map_err(|e| io(path, "write", &e))?;
            file.sync_all().map_err(|e| io(path, "fsync", &e))?;
        } else {
            let mut found = [0u8; SLOT as usize];
            file.read_exact_at(&mut found, 0).map_err(|e| io(path, "read", &e))?;
            if found != header {
                return Err(StoreError::Config(format!("{} is not a Chime secret key file", path.display())));
            }
        }
        // A slot cut short by a crash while the file grew held no acknowledged key: ignore it.
        let len = (size / SLOT).max(1);
        let mut free = BTreeSet::new();
        let mut slot = [0u8; SLOT as usize];
        for n in 1..len {
            file.read_exact_at(&mut slot, n * SLOT).map_err(|e| io(path, "read", &e))?;
            if slot.iter().all(|&b| b == 0) {
                free.insert(n);
            }
        }
        Ok(Arc::new(KeyFile {
            path: path.to_path_buf(),
            inner: Mutex::new(Slots { file, free, len }),
            rng: SystemRandom::new(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes `n` new keys, durable (written and fsynced) when this returns.
    pub fn create(&self, n: usize) -> Result<Vec<(Slot, [u8; 32])>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut slots = self.lock();
        let mut made = Vec::with_capacity(n);
        for _ in 0..n {
            let mut key = [0u8; 32];
            // An all-zero key would read as a free slot; the chance is 2^-256, but it costs nothing.
            while key.iter().all(|&b| b == 0) {
                self.rng.fill(&mut key).map_err(|_| StoreError::Unavailable("no randomness for a key".into()))?;
            }
            let slot = match slots.free.pop_first() {
                Some(slot) => slot,
                None => {
                    slots.len += 1;
                    slots.len - 1
                }
            };
            if let Err(e) = slots.file.write_all_at(&key, slot * SLOT) {
                slots.free.insert(slot);
                return Err(io(&self.path, "write", &e));
            }
            made.push((slot, key));
        }
        slots.file.sync_data().map_err(|e| io(&self.path, "fsync", &e))?;
        Ok(made)
    }

    /// The key in `slot`, `None` once destroyed (or never made).
    pub fn key(&self, slot: Slot) -> Result<Option<[u8; 32]>> {
        let slots = self.lock();
        if slot == 0 || slot >= slots.len {
            return Ok(None);
        }
        let mut key = [0u8; 32];
        slots.file.read_exact_at(&mut key, slot * SLOT).map_err(|e| io(&self.path, "read", &e))?;
        Ok((!key.iter().all(|&b| b == 0)).then_some(key))
    }

    /// Destroys the keys in `slots`: overwritten with zeros in place and fsynced before this
    /// returns; the slots are free for new keys.
    pub fn destroy(&self, which: &[Slot]) -> Result<()> {
        if which.is_empty() {
            return Ok(());
        }
        let mut slots = self.lock();
        for &slot in which {
            if slot == 0 || slot >= slots.len {
                continue;
            }
            slots.file.write_all_at(&[0u8; SLOT as usize], slot * SLOT).map_err(|e| io(&self.path, "write", &e))?;
        }
        slots.file.sync_data().map_err(|e| io(&self.path, "fsync", &e))?;
        for &slot in which {
            if slot != 0 && slot < slots.len {
                slots.free.insert(slot);
            }
        }
        Ok(())
    }

    /// Seals `text` of `room` under the key in `slot` (as [`KeyFile::create`] returned it).
    pub fn seal(&self, room: RoomId, slot: Slot, key: &[u8; 32], text: &str) -> Result<String> {
        let sealing = LessSafeKey::new(
            UnboundKey::new(&CHACHA20_POLY1305, key).map_err(|_| StoreError::Database("bad key length".into()))?,
        );
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| StoreError::Unavailable("no randomness for a nonce".into()))?;
        let mut data = text.as_bytes().to_vec();
        sealing
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad(room, slot)), &mut data)
            .map_err(|_| StoreError::Database("sealing failed".into()))?;
        let mut out = String::with_capacity(SEALED.len() + 21 + 2 * (NONCE_LEN + data.len()));
        out.push_str(SEALED);
        out.push_str(&slot.to_string());
        out.push(':');
        out.push_str(&hex(&nonce));
        out.push_str(&hex(&data));
        Ok(out)
    }

    /// Opens a sealed body of `room`: `None` when its key is gone (or it is not a sealed body
    /// of this room).
    pub fn open_sealed(&self, room: RoomId, body: &str) -> Result<Option<String>> {
        let Some(slot) = slot_of(body) else { return Ok(None) };
        let Some(key) = self.key(slot)? else { return Ok(None) };
        let Some(sealed) = body.split_once('\n').map_or(body, |(b, _)| b).rsplit(':').next().and_then(unhex) else {
            return Ok(None);
        };
        if sealed.len() < NONCE_LEN {
            return Ok(None);
        }
        let (nonce, data) = sealed.split_at(NONCE_LEN);
        let Ok(nonce) = Nonce::try_assume_unique_for_key(nonce) else { return Ok(None) };
        let Ok(unbound) = UnboundKey::new(&CHACHA20_POLY1305, &key) else { return Ok(None) };
        let mut data = data.to_vec();
        let Ok(plain) = LessSafeKey::new(unbound).open_in_place(nonce, Aad::from(aad(room, slot)), &mut data) else {
            return Ok(None);
        };
        Ok(String::from_utf8(plain.to_vec()).ok())
    }
}

/// The slot a sealed body names.
pub fn slot_of(body: &str) -> Option<Slot> {
    body.strip_prefix(SEALED)?.split(':').next()?.parse().ok()
}

fn aad(room: RoomId, slot: Slot) -> [u8; 16] {
    let mut aad = [0u8; 16];
    aad[..8].copy_from_slice(&room.get().to_le_bytes());
    aad[8..].copy_from_slice(&slot.to_le_bytes());
    aad
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// The names a sealed body still carries in clear after its ciphertext (`\n@ann @bob`): the store
/// resolves mentions from the text it is given, and who was mentioned is kept (in `mentions`)
/// after a delete anyway; the text around the names is not.
fn with_mentions(mut sealed: String, text: &str) -> String {
    let names = crate::mentioned_names(text);
    if !names.is_empty() {
        sealed.push('\n');
        sealed.push_str(&names.iter().map(|n| format!("@{n}")).collect::<Vec<_>>().join(" "));
    }
    sealed
}

/// A store that seals the text of secret rooms (see the module doc) and otherwise passes every
/// call to the store it wraps.
pub struct SecretStore {
    /// The database.
    inner: Box<dyn crate::Store>,
    /// The keys.
    keys: Arc<KeyFile>,
    /// Whether a room is secret; a room's kind never changes, so this is asked once per room.
    secret: HashMap<RoomId, bool>,
}

impl SecretStore {
    /// Wraps `inner`, keeping keys in `keys`.
    pub fn new(inner: Box<dyn crate::Store>, keys: Arc<KeyFile>) -> SecretStore {
        SecretStore { inner, keys, secret: HashMap::new() }
    }

    fn is_secret(&mut self, room: RoomId) -> Result<bool> {
        if let Some(&s) = self.secret.get(&room) {
            return Ok(s);
        }
        let Some(r) = self.inner.room(room)? else { return Ok(false) };
        let s = r.kind == RoomKind::SECRET;
        if self.secret.len() > 100_000 {
            self.secret.clear();
        }
        self.secret.insert(room, s);
        Ok(s)
    }

    /// Opens the text of a delta of a secret room that has text; a tombstone (empty) when its key
    /// is gone.
    fn reveal(&mut self, d: &mut DeltaRecord) -> Result<()> {
        if matches!(d.kind, RecordKind::MESSAGE | RecordKind::EDIT | RecordKind::REPLY) && self.is_secret(d.room)? {
            d.body = self.keys.open_sealed(d.room, &d.body)?.unwrap_or_default();
        }
        Ok(())
    }

    fn reveal_all(&mut self, deltas: &mut [DeltaRecord]) -> Result<()> {
        deltas.iter_mut().try_for_each(|d| self.reveal(d))
    }

    fn reveal_messages(&mut self, room: RoomId, messages: &mut [MessageRecord]) -> Result<()> {
        if !self.is_secret(room)? {
            return Ok(());
        }
        for m in messages {
            if let Some(text) = m.text.take() {
                m.text = self.keys.open_sealed(room, &text)?;
            }
        }
        Ok(())
    }

    /// The stored (sealed) body of message `seq` of `room`.
    fn message_body(&mut self, room: RoomId, seq: crate::Seq) -> Result<Option<String>> {
        let page =
            self.inner.deltas_page(room, crate::Order::OldestFirst, crate::Seq(seq.get().saturating_sub(1)), 1)?;
        Ok(page
            .into_iter()
            .find(|d| d.seq == seq && matches!(d.kind, RecordKind::MESSAGE | RecordKind::REPLY))
            .map(|d| d.body))
    }

    /// The slot of message `seq` of `room` (read from its sealed body).
    fn slot_of_message(&mut self, room: RoomId, seq: crate::Seq) -> Result<Option<Slot>> {
        Ok(self.message_body(room, seq)?.as_deref().and_then(slot_of))
    }
}

/// Why a secret room takes no files: a file's name and bytes are not sealed under the message's
/// key (the bytes live in the content store, shared by content with other rooms), so deleting
/// the message could not destroy them for real.
fn no_files() -> StoreError {
    StoreError::Forbidden("files are not shared in secret rooms: deleting them could not destroy their bytes".into())
}

macro_rules! forward {
    ($($name:ident(&mut self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        $(fn $name(&mut self $(, $arg: $ty)*) -> $ret { self.inner.$name($($arg),*) })*
    };
}

impl crate::SharedStore for SecretStore {
    forward! {
        create_user(&mut self, name: &str, password_hash: &str) -> Result<crate::UserRecord>;
        user_by_name(&mut self, name: &str) -> Result<Option<crate::UserRecord>>;
        create_session(&mut self, session: &crate::NewSession) -> Result<crate::SessionRecord>;
        session_user(&mut self, token_hash: &[u8; 32], now_ms: i64, limits: &crate::SessionLimits)
            -> Result<Option<(crate::UserRecord, crate::SessionRecord)>>;
        list_sessions(&mut self, user: crate::UserId, now_ms: i64, limits: &crate::SessionLimits)
            -> Result<Vec<crate::SessionRecord>>;
        revoke_sessions(&mut self, user: crate::UserId, which: Option<crate::SessionId>, now_ms: i64)
            -> Result<Vec<crate::SessionId>>;
        touch_sessions(&mut self, sessions: &[crate::SessionId], now_ms: i64) -> Result<()>;
        profile(&mut self, user: crate::UserId) -> Result<Option<crate::ProfileRecord>>;
        profile_by_name(&mut self, name: &str) -> Result<Option<crate::ProfileRecord>>;
        update_profile(&mut self, user: crate::UserId, update: &crate::ProfileUpdate) -> Result<crate::ProfileRecord>;
        set_setting(&mut self, user: crate::UserId, setting: &crate::SettingWrite<'_>) -> Result<u64>;
        settings(&mut self, user: crate::UserId, after_room: RoomId, limit: u32) -> Result<crate::SettingsRecord>;
        create_room(&mut self, name: &str, kind: RoomKind, owner: crate::UserId, owner_name: &str, now_ms: i64,
            max_rooms: u64) -> Result<(crate::RoomRecord, DeltaRecord)>;
        open_direct(&mut self, user: crate::UserId, user_name: &str, peer: &str, now_ms: i64, max_rooms: u64)
            -> Result<crate::DirectRoom>;
        room(&mut self, room: RoomId) -> Result<Option<crate::RoomRecord>>;
        create_server(&mut self, server: &crate::NewServer, max_servers: u64)
            -> Result<(crate::ServerRecord, crate::RoomRecord, DeltaRecord)>;
        join_server(&mut self, server: crate::ServerId, user: crate::UserId, now_ms: i64, max_servers: u64)
            -> Result<(crate::ServerRecord, Vec<crate::RoomRecord>, bool)>;
        leave_server(&mut self, server: crate::ServerId, user: crate::UserId) -> Result<Vec<RoomId>>;
        servers_page(&mut self, user: crate::UserId, after: crate::ServerId, limit: u32)
            -> Result<Vec<crate::ServerRecord>>;
        create_channel(&mut self, channel: &crate::NewChannel) -> Result<(crate::RoomRecord, DeltaRecord)>;
        set_server_role(&mut self, server: crate::ServerId, actor: crate::UserId, target: &str, role: &str)
            -> Result<bool>;
        define_server_role(&mut self, server: crate::ServerId, actor: crate::UserId, name: &str,
            perms: Option<crate::Permissions>) -> Result<()>;
        rooms_of_user(&mut self, user: crate::UserId) -> Result<Vec<crate::RoomRecord>>;
        rooms_page(&mut self, user: crate::UserId, after_room: RoomId, limit: u32) -> Result<Vec<crate::RoomRecord>>;
        is_member(&mut self, room: RoomId, user: crate::UserId) -> Result<bool>;
        room_details(&mut self, room: RoomId, user: crate::UserId) -> Result<Option<crate::RoomDetailsRecord>>;
        members(&mut self, room: RoomId, after_user: crate::UserId, limit: u32) -> Result<Vec<crate::MemberRecord>>;
        mark_read(&mut self, room: RoomId, user: crate::UserId, delivered: crate::Seq, read: crate::Seq)
            -> Result<crate::UnreadRecord>;
        unread(&mut self, user: crate::UserId, after: RoomId, limit: u32) -> Result<Vec<crate::UnreadRecord>>;
        partitions(&mut self, room: RoomId) -> Result<Vec<crate::PartitionRecord>>;
        ping(&mut self) -> Result<()>;
        checkpoint(&mut self) -> Result<()>;
        push_targets(&mut self, room: RoomId, seq: crate::Seq, author: crate::UserId) -> Result<Vec<crate::PushTarget>>;
        moderate_server(&mut self, server: crate::ServerId, actor: crate::UserId, target: &str,
            action: &crate::MemberAction, now_ms: i64) -> Result<crate::ServerModerated>;
        last_seen(&mut self, users: &[crate::UserId]) -> Result<Vec<(crate::UserId, i64)>>;
        upload(&mut self, id: u64, user: crate::UserId) -> Result<crate::UploadRecord>;
        file_for(&mut self, file: u64, user: crate::UserId) -> Result<crate::FileRecord>;
        drop_content(&mut self, sha256: &[u8; 32]) -> Result<bool>;
        unreferenced_contents(&mut self, limit: u32) -> Result<Vec<[u8; 32]>>;
    }

    fn create_upload(&mut self, u: &crate::NewUpload) -> Result<crate::UploadRecord> {
        if self.is_secret(u.room)? {
            return Err(no_files());
        }
        self.inner.create_upload(u)
    }

    fn mentions(&mut self, user: crate::UserId, limit: u32) -> Result<Vec<MentionRecord>> {
        let mut mentions = self.inner.mentions(user, limit)?;
        for m in &mut mentions {
            if self.is_secret(m.room)? {
                if let Some(text) = m.text.take() {
                    m.text = self.keys.open_sealed(m.room, &text)?;
                }
            }
        }
        Ok(mentions)
    }

    fn deltas_after(&mut self, room: RoomId, after: crate::Seq, limit: u32) -> Result<Vec<DeltaRecord>> {
        let mut deltas = self.inner.deltas_after(room, after, limit)?;
        self.reveal_all(&mut deltas)?;
        Ok(deltas)
    }

    fn messages_before(
        &mut self,
        room: RoomId,
        user: crate::UserId,
        before: crate::Seq,
        limit: u32,
    ) -> Result<Vec<MessageRecord>> {
        let mut messages = self.inner.messages_before(room, user, before, limit)?;
        self.reveal_messages(room, &mut messages)?;
        Ok(messages)
    }

    fn deltas_page(
        &mut self,
        room: RoomId,
        order: crate::Order,
        cursor: crate::Seq,
        limit: u32,
    ) -> Result<Vec<DeltaRecord>> {
        let mut deltas = self.inner.deltas_page(room, order, cursor, limit)?;
        self.reveal_all(&mut deltas)?;
        Ok(deltas)
    }

    fn search(
        &mut self,
        room: RoomId,
        user: crate::UserId,
        words: &[String],
        before: crate::Seq,
        limit: u32,
    ) -> Result<Vec<MessageRecord>> {
        // Secret rooms are never indexed (crate::search::indexable), so this finds nothing there.
        let mut messages = self.inner.search(room, user, words, before, limit)?;
        self.reveal_messages(room, &mut messages)?;
        Ok(messages)
    }
}

impl crate::Store for SecretStore {
    forward! {
        join_room(&mut self, room: RoomId, user: crate::UserId, user_name: &str, now_ms: i64, max_rooms: u64)
            -> Result<Option<DeltaRecord>>;
        leave_room(&mut self, room: RoomId, user: crate::UserId, user_name: &str, now_ms: i64) -> Result<DeltaRecord>;
        moderate(&mut self, m: &crate::NewModeration) -> Result<crate::ModerationOutcome>;
        signal(&mut self, room: RoomId, actor: (crate::UserId, &str), kind: RecordKind, call: crate::Seq, data: &str,
            now_ms: i64) -> Result<DeltaRecord>;
        define_role(&mut self, room: RoomId, actor: crate::UserId, actor_name: &str, name: &str,
            perms: Option<crate::Permissions>, now_ms: i64) -> Result<DeltaRecord>;
    }

    fn share_file(&mut self, f: &crate::NewFile) -> Result<(crate::FileRecord, DeltaRecord)> {
        if self.is_secret(f.room)? {
            return Err(no_files());
        }
        self.inner.share_file(f)
    }

    fn forward(
        &mut self,
        actor: (crate::UserId, &str),
        room: RoomId,
        seq: crate::Seq,
        to_room: RoomId,
        now_ms: i64,
    ) -> Result<DeltaRecord> {
        // Out of a secret room, a copy would outlive the original's delete; into one, the copy
        // would have to be sealed under a key of its own, which forward does not do yet.
        if self.is_secret(room)? || self.is_secret(to_room)? {
            return Err(StoreError::Forbidden("messages are not forwarded out of or into secret rooms".into()));
        }
        self.inner.forward(actor, room, seq, to_room, now_ms)
    }

    fn append_posts(&mut self, posts: &[NewPost]) -> Result<Vec<PostOutcome>> {
        let mut secret = Vec::with_capacity(posts.len());
        for p in posts {
            secret.push(self.is_secret(p.room)?);
        }
        if !secret.contains(&true) {
            return self.inner.append_posts(posts);
        }
        // Keys first, durable before anything can be acknowledged.
        let keys = self.keys.create(secret.iter().filter(|&&s| s).count())?;
        let mut keys_iter = keys.iter();
        let mut sealed = Vec::with_capacity(posts.len());
        let mut slots = Vec::with_capacity(posts.len());
        for (p, &s) in posts.iter().zip(&secret) {
            let mut p = p.clone();
            match keys_iter.next().filter(|_| s) {
                Some((slot, key)) => {
                    p.text = with_mentions(self.keys.seal(p.room, *slot, key, &p.text)?, &p.text);
                    slots.push(Some(*slot));
                }
                None => slots.push(None),
            }
            sealed.push(p);
        }
        let outcomes = match self.inner.append_posts(&sealed) {
            Ok(outcomes) => outcomes,
            Err(e) => {
                let _ = self.keys.destroy(&keys.iter().map(|(s, _)| *s).collect::<Vec<_>>());
                return Err(e);
            }
        };
        let mut unused = Vec::new();
        let mut out = Vec::with_capacity(outcomes.len());
        for (outcome, (slot, original)) in outcomes.into_iter().zip(slots.into_iter().zip(posts)) {
            match outcome {
                PostOutcome::Inserted(mut d) => {
                    if slot.is_some() {
                        // The delta to publish carries the text as posted.
                        d.body.clone_from(&original.text);
                    }
                    out.push(PostOutcome::Inserted(d));
                }
                other => {
                    unused.extend(slot);
                    out.push(other);
                }
            }
        }
        self.keys.destroy(&unused)?;
        Ok(out)
    }

    fn act(&mut self, a: &NewAction) -> Result<ActionOutcome> {
        if !self.is_secret(a.room)? {
            return self.inner.act(a);
        }
        match &a.action {
            MessageAction::Edit { text } => {
                // An edit is sealed under its message's key, so destroying that key takes the
                // edits with it. No key: the message is gone or not a message; nothing is written.
                let key = match self.slot_of_message(a.room, a.target)? {
                    Some(slot) => self.keys.key(slot)?.map(|k| (slot, k)),
                    None => None,
                };
                let Some((slot, key)) = key else {
                    return Err(StoreError::NotFound(format!("message {} in room {}", a.target, a.room)));
                };
                let mut sealed = a.clone();
                sealed.action =
                    MessageAction::Edit { text: with_mentions(self.keys.seal(a.room, slot, &key, text)?, text) };
                let outcome = self.inner.act(&sealed)?;
                Ok(match outcome {
                    ActionOutcome::Applied(mut d) => {
                        d.body.clone_from(text);
                        ActionOutcome::Applied(d)
                    }
                    unchanged => unchanged,
                })
            }
            MessageAction::Reply { text } => {
                let keys = self.keys.create(1)?;
                let Some(&(slot, key)) = keys.first() else {
                    return Err(StoreError::Database("no key was made".into()));
                };
                let mut sealed = a.clone();
                sealed.action =
                    MessageAction::Reply { text: with_mentions(self.keys.seal(a.room, slot, &key, text)?, text) };
                match self.inner.act(&sealed) {
                    Ok(ActionOutcome::Applied(mut d)) => {
                        d.body.clone_from(text);
                        Ok(ActionOutcome::Applied(d))
                    }
                    Ok(unchanged) => {
                        self.keys.destroy(&[slot])?;
                        Ok(unchanged)
                    }
                    Err(e) => {
                        let _ = self.keys.destroy(&[slot]);
                        Err(e)
                    }
                }
            }
            MessageAction::Delete => {
                let body = self.message_body(a.room, a.target)?;
                let outcome = self.inner.act(a)?;
                // Applied, or already deleted (a retry after a crash between the commit and the
                // key's destruction): either way the message is deleted and its key must go. Only
                // while the slot still opens this message, though: after a destruction the slot
                // may hold a newer message's key.
                if let Some(body) = body {
                    if let Some(slot) = slot_of(&body) {
                        if self.keys.open_sealed(a.room, &body)?.is_some() {
                            self.keys.destroy(&[slot])?;
                        }
                    }
                }
                Ok(outcome)
            }
            _ => self.inner.act(a),
        }
    }
}
