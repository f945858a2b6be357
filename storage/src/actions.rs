//! Deltas that act on an earlier message (edit, delete, react, unreact, pin, unpin) or answer it
//! (reply): the request types, and the one judgement both stores apply before writing.
//!
//! Each store reads, inside the write transaction, the actor's role and the target message's
//! row and state, hands them to [`judge`], and writes what it decides. Keeping the rules here
//! means SQLite and PostgreSQL cannot disagree on who may do what, and the conformance tests walk
//! one table of rules through both.

use crate::{RecordKind, Result, StoreError};
use chime_protocol::{Permissions, RoomId, Seq, UserId};

/// What an action does to its target message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageAction {
    /// Replace the text (one's own message only).
    Edit {
        /// The new text.
        text: String,
    },
    /// Delete it (one's own with `delete_own`, anyone's with `delete_any`). Soft: the log keeps
    /// the original, readers see it deleted; in a secret room the text is destroyed.
    Delete,
    /// Add the actor's reaction.
    React {
        /// The emoji.
        emoji: String,
    },
    /// Take the actor's reaction back.
    Unreact {
        /// The emoji.
        emoji: String,
    },
    /// Pin it.
    Pin,
    /// Unpin it.
    Unpin,
    /// Answer it with a new message.
    Reply {
        /// The reply's text.
        text: String,
    },
}

impl MessageAction {
    /// The kind of the delta the action writes.
    pub fn kind(&self) -> RecordKind {
        match self {
            MessageAction::Edit { .. } => RecordKind::EDIT,
            MessageAction::Delete => RecordKind::DELETE,
            MessageAction::React { .. } => RecordKind::REACT,
            MessageAction::Unreact { .. } => RecordKind::UNREACT,
            MessageAction::Pin => RecordKind::PIN,
            MessageAction::Unpin => RecordKind::UNPIN,
            MessageAction::Reply { .. } => RecordKind::REPLY,
        }
    }

    /// The delta's `body` column: the text or emoji, empty otherwise.
    pub fn body(&self) -> &str {
        match self {
            MessageAction::Edit { text } | MessageAction::Reply { text } => text,
            MessageAction::React { emoji } | MessageAction::Unreact { emoji } => emoji,
            _ => "",
        }
    }
}

/// One action to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAction {
    /// The room.
    pub room: RoomId,
    /// The message acted on or answered.
    pub target: Seq,
    /// Who acts.
    pub actor: UserId,
    /// The actor's name (copied into the returned delta).
    pub actor_name: String,
    /// What they do.
    pub action: MessageAction,
    /// For edits and replies: as a post's key, a retry with the same key writes nothing. Empty:
    /// none (deletes, reactions and pins are idempotent by what they do).
    pub idempotency_key: String,
    /// Commit time, Unix milliseconds.
    pub now_ms: i64,
}

/// What became of an action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionOutcome {
    /// Written: the new delta, to publish.
    Applied(crate::DeltaRecord),
    /// Nothing to write: the message is already in that state (or the key was used). `seq` and
    /// `ts_ms` are those of the delta that made it so.
    Unchanged {
        /// The earlier delta's seq.
        seq: Seq,
        /// Its commit time.
        ts_ms: i64,
    },
}

/// The target message as a store read it, inside the write transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Its kind (an action applies only to `MESSAGE` and `REPLY`).
    pub kind: RecordKind,
    /// Its author.
    pub author: UserId,
    /// The seq of the `DELETE` that deleted it.
    pub deleted: Option<Seq>,
    /// The seq of the `PIN` that pinned it.
    pub pinned: Option<Seq>,
    /// For `React`/`Unreact`: the seq of the actor's standing reaction with that emoji.
    pub reaction: Option<Seq>,
}

/// What the store should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Append the action's delta and apply it to the message's state.
    Write,
    /// Write nothing: the state already is what the action asks; answer this seq.
    AlreadyDone(Seq),
}

/// The permission the actor needs, given who wrote the target.
pub fn required(action: &MessageAction, actor: UserId, author: UserId) -> Permissions {
    match action {
        MessageAction::Edit { .. } => Permissions::EDIT_OWN,
        MessageAction::Delete if actor == author => Permissions::DELETE_OWN,
        MessageAction::Delete => Permissions::DELETE_ANY,
        MessageAction::React { .. } | MessageAction::Unreact { .. } => Permissions::REACT,
        MessageAction::Pin | MessageAction::Unpin => Permissions::PIN,
        MessageAction::Reply { .. } => Permissions::POST,
    }
}

/// Decides an action: `NotFound` when the target is no message of the room (or was deleted, for
/// anything but a repeated delete), `Forbidden` when the actor's permissions do not allow it,
/// else whether to write.
pub fn judge(
    room: RoomId,
    seq: Seq,
    action: &MessageAction,
    actor: UserId,
    perms: Permissions,
    target: Option<&Target>,
) -> Result<Verdict> {
    let no_message = || StoreError::NotFound(format!("no message {seq} in room {room}"));
    let target = target
        .filter(|t| t.kind == RecordKind::MESSAGE || t.kind == RecordKind::REPLY || t.kind == RecordKind::FILE_SHARED)
        .ok_or_else(no_message)?;
    if matches!(action, MessageAction::Edit { .. }) && target.kind == RecordKind::FILE_SHARED {
        return Err(StoreError::Forbidden(format!("message {seq} is a shared file; it cannot be edited")));
    }
    let needed = required(action, actor, target.author);
    if matches!(action, MessageAction::Edit { .. }) && actor != target.author {
        return Err(StoreError::Forbidden(format!("message {seq} is not yours to edit")));
    }
    if !perms.contains(needed) {
        let name = needed.name().unwrap_or("?");
        return Err(StoreError::Forbidden(format!("your role in room {room} does not allow {name}")));
    }
    if let Some(deleted) = target.deleted {
        return match action {
            MessageAction::Delete => Ok(Verdict::AlreadyDone(deleted)),
            _ => Err(StoreError::NotFound(format!("message {seq} in room {room} was deleted"))),
        };
    }
    Ok(match action {
        MessageAction::React { .. } => target.reaction.map_or(Verdict::Write, Verdict::AlreadyDone),
        MessageAction::Unreact { emoji } => match target.reaction {
            Some(_) => Verdict::Write,
            None => return Err(StoreError::NotFound(format!("you have no {emoji} reaction on message {seq}"))),
        },
        MessageAction::Pin => target.pinned.map_or(Verdict::Write, Verdict::AlreadyDone),
        MessageAction::Unpin => match target.pinned {
            Some(_) => Verdict::Write,
            None => return Err(StoreError::NotFound(format!("message {seq} in room {room} is not pinned"))),
        },
        _ => Verdict::Write,
    })
}

/// A message in its current state, as `VIEW` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRecord {
    /// The message's own delta.
    pub seq: Seq,
    /// Its author.
    pub author_id: UserId,
    /// The author's name.
    pub author: String,
    /// When it was posted.
    pub ts_ms: i64,
    /// Its latest text; `None` once deleted.
    pub text: Option<String>,
    /// When it was last edited.
    pub edited_ms: Option<i64>,
    /// Whether it was deleted.
    pub deleted: bool,
    /// The message it answers.
    pub reply_to: Option<Seq>,
    /// Whether it is pinned.
    pub pinned: bool,
    /// Its reactions: emoji, count, whether the asking user made one; by emoji.
    pub reactions: Vec<(String, u64, bool)>,
}

/// Hangs reaction rows (seq, emoji, count, mine), as both stores read them for a page of
/// messages, on their messages.
pub(crate) fn attach_reactions(messages: &mut [MessageRecord], rows: Vec<(i64, String, i64, bool)>) {
    for (seq, emoji, count, mine) in rows {
        let seq = Seq(u64::try_from(seq).unwrap_or(0));
        if let Some(m) = messages.iter_mut().find(|m| m.seq == seq) {
            m.reactions.push((emoji, u64::try_from(count).unwrap_or(0), mine));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(author: u64) -> Target {
        Target { kind: RecordKind::MESSAGE, author: UserId(author), deleted: None, pinned: None, reaction: None }
    }

    #[test]
    fn only_the_author_edits() {
        let edit = MessageAction::Edit { text: "x".into() };
        let ok = judge(RoomId(1), Seq(2), &edit, UserId(1), Permissions::EVERYTHING, Some(&message(1)));
        assert_eq!(ok.ok(), Some(Verdict::Write));
        let theirs = judge(RoomId(1), Seq(2), &edit, UserId(1), Permissions::EVERYTHING, Some(&message(2)));
        assert!(matches!(theirs, Err(StoreError::Forbidden(_))));
    }

    #[test]
    fn actions_on_what_is_not_a_message_are_not_found() {
        let join = Target { kind: RecordKind::JOIN, ..message(1) };
        let r = judge(RoomId(1), Seq(2), &MessageAction::Pin, UserId(1), Permissions::EVERYTHING, Some(&join));
        assert!(matches!(r, Err(StoreError::NotFound(_))));
        let r = judge(RoomId(1), Seq(2), &MessageAction::Pin, UserId(1), Permissions::EVERYTHING, None);
        assert!(matches!(r, Err(StoreError::NotFound(_))));
    }

    #[test]
    fn repeats_answer_the_first() {
        let gone = Target { deleted: Some(Seq(9)), ..message(1) };
        let r = judge(RoomId(1), Seq(2), &MessageAction::Delete, UserId(1), Permissions::MEMBER, Some(&gone));
        assert_eq!(r.ok(), Some(Verdict::AlreadyDone(Seq(9))));
        let reacted = Target { reaction: Some(Seq(5)), ..message(2) };
        let react = MessageAction::React { emoji: "x".into() };
        let r = judge(RoomId(1), Seq(2), &react, UserId(1), Permissions::MEMBER, Some(&reacted));
        assert_eq!(r.ok(), Some(Verdict::AlreadyDone(Seq(5))));
        let unreact = MessageAction::Unreact { emoji: "x".into() };
        let r = judge(RoomId(1), Seq(2), &unreact, UserId(1), Permissions::MEMBER, Some(&message(2)));
        assert!(matches!(r, Err(StoreError::NotFound(_))));
    }
}
