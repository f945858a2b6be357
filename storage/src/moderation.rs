//! What a member may do, and moderation (invite, kick, ban, mute, roles): the rules both stores
//! apply, in one place.
//!
//! A member's permissions come from their role: `owner` holds everything; a room may define
//! named roles, and may redefine `member` (the room-wide default every plain member gets); the
//! other built-in roles have the fixed sets of [`Permissions::of_builtin`]. A member muted by a
//! moderator loses `post`. Roles are ranked (owner > admin > moderator > everyone else): a
//! moderator acts only on members ranked below them and never hands out a role at or above their
//! own, except that an owner may make another owner.

use crate::{DeltaRecord, RecordKind, Result, RoomId, Seq, StoreError, UserId};
use chime_protocol::Permissions;

/// A role's rank: who may act on whom.
pub fn rank(role: &str) -> u8 {
    match role {
        "owner" => 4,
        "admin" => 3,
        "moderator" => 2,
        _ => 1,
    }
}

/// A member's permissions: their role's set (a room's own definition of it when there is one,
/// else the built-in one, else none), less `post` when muted. An owner always holds everything.
pub fn effective(role: &str, defined: Option<Permissions>, muted: bool) -> Permissions {
    let base = if role == "owner" {
        Permissions::EVERYTHING
    } else {
        defined.or_else(|| Permissions::of_builtin(role)).unwrap_or(Permissions::NONE)
    };
    if muted {
        base.without(Permissions::POST)
    } else {
        base
    }
}

/// Whether a role name may be defined by a room: not `owner` (always everything), and a plain
/// name (1 to 32 lower-case letters, digits, `-` or `_`).
pub fn definable(name: &str) -> bool {
    name != "owner"
        && !name.is_empty()
        && name.len() <= 32
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Refuses defining `name` unless the actor may manage roles and the name may be defined.
pub fn check_define(room: RoomId, name: &str, actor: Permissions) -> Result<()> {
    if !actor.contains(Permissions::MANAGE_ROLES) {
        return Err(StoreError::Forbidden(format!("your role in room {room} does not allow manage_roles")));
    }
    if !definable(name) {
        return Err(StoreError::Forbidden(format!(
            "{name:?} cannot be defined: owner is fixed, names are 1 to 32 of a-z 0-9 - _"
        )));
    }
    Ok(())
}

/// The body of a `ROLE_DEFINED` delta: `NAME=BITS`, or `NAME` for a removal.
pub fn role_body(name: &str, perms: Option<Permissions>) -> String {
    match perms {
        Some(p) => format!("{name}={}", p.0),
        None => name.to_string(),
    }
}

/// Reads a `ROLE_DEFINED` body back.
pub fn parse_role_body(body: &str) -> (String, Option<Permissions>) {
    match body.split_once('=') {
        Some((name, bits)) => (name.to_string(), bits.parse().ok().map(Permissions)),
        None => (body.to_string(), None),
    }
}

/// A moderation step on one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberAction {
    /// Make the user a member (an invite-only room's way in).
    Invite,
    /// Remove a member; they may come back (join a public room, or be invited).
    Kick,
    /// Remove the user (if a member) and keep them out until unbanned.
    Ban,
    /// Lift a ban.
    Unban,
    /// Stop a member from posting.
    Mute,
    /// Let a muted member post again.
    Unmute,
    /// Give a member a role.
    SetRole(String),
}

impl MemberAction {
    /// The delta it writes.
    pub fn kind(&self) -> RecordKind {
        match self {
            MemberAction::Invite => RecordKind::INVITE,
            MemberAction::Kick => RecordKind::KICK,
            MemberAction::Ban => RecordKind::BAN,
            MemberAction::Unban => RecordKind::UNBAN,
            MemberAction::Mute => RecordKind::MUTE,
            MemberAction::Unmute => RecordKind::UNMUTE,
            MemberAction::SetRole(_) => RecordKind::ROLE,
        }
    }

    /// The permission it needs.
    pub fn needs(&self) -> Permissions {
        match self {
            MemberAction::Invite => Permissions::INVITE,
            MemberAction::Kick => Permissions::KICK,
            MemberAction::Ban | MemberAction::Unban => Permissions::BAN,
            MemberAction::Mute | MemberAction::Unmute => Permissions::MUTE,
            MemberAction::SetRole(_) => Permissions::MANAGE_ROLES,
        }
    }
}

/// One moderation request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewModeration {
    /// The room.
    pub room: RoomId,
    /// Who acts.
    pub actor: UserId,
    /// The actor's name.
    pub actor_name: String,
    /// The user acted on, by name.
    pub target: String,
    /// What is done.
    pub action: MemberAction,
    /// The room cap an invited user must stay within.
    pub max_rooms: u64,
    /// Commit time, Unix milliseconds.
    pub now_ms: i64,
}

/// What became of a moderation request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModerationOutcome {
    /// Written. `delta.target` is the user's id.
    Applied {
        /// The delta (INVITE, KICK, BAN, UNBAN, MUTE, UNMUTE or ROLE; its body the user's name,
        /// or for ROLE the role).
        delta: DeltaRecord,
        /// The user acted on.
        user: UserId,
        /// The user became a member (INVITE).
        added: bool,
        /// The user stopped being a member (KICK, or BAN of a member).
        removed: bool,
    },
    /// The user already is as asked (a member invited, a banned user banned, ...): nothing
    /// written; `head` is the room's head.
    Unchanged {
        /// The room's head seq.
        head: Seq,
    },
}

/// The user acted on, as a store read them in the transaction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemberState {
    /// Their role, `None` when not a member.
    pub role: Option<String>,
    /// Muted by a moderator.
    pub muted: bool,
    /// Banned from the room.
    pub banned: bool,
}

/// What the store should write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModVerdict {
    /// Write the delta and apply the step.
    Write,
    /// Nothing to do.
    Unchanged,
}

/// Judges a moderation step: the actor's permission and rank against the target's, and whether
/// the step changes anything. `role_known` says whether a `SetRole` names a built-in role or one
/// the room defined.
pub fn judge(
    room: RoomId,
    action: &MemberAction,
    actor: (UserId, &str, Permissions),
    target: (UserId, &str, &MemberState),
    role_known: bool,
) -> Result<ModVerdict> {
    let (actor_id, actor_role, perms) = actor;
    let (target_id, target_name, state) = target;
    let forbidden = |why: String| Err(StoreError::Forbidden(why));
    if !perms.contains(action.needs()) {
        let name = action.needs().name().unwrap_or("?");
        return forbidden(format!("your role in room {room} does not allow {name}"));
    }
    if actor_id == target_id && *action != MemberAction::Invite {
        return forbidden("not on yourself".into());
    }
    // Acting on a member needs a higher rank than theirs.
    if let Some(role) = &state.role {
        if *action != MemberAction::Invite && rank(actor_role) <= rank(role) && actor_role != "owner" {
            return forbidden(format!("{target_name} is {role}, not below you"));
        }
        if *action != MemberAction::Invite && actor_role == "owner" && role == "owner" {
            return forbidden(format!("{target_name} is an owner too"));
        }
    }
    let not_member = || StoreError::NotFound(format!("{target_name} is not a member of room {room}"));
    Ok(match action {
        MemberAction::Invite if state.banned => {
            return forbidden(format!("{target_name} is banned from room {room}; unban first"))
        }
        MemberAction::Invite if state.role.is_some() => ModVerdict::Unchanged,
        MemberAction::Invite => ModVerdict::Write,
        MemberAction::Kick => {
            state.role.as_ref().ok_or_else(not_member)?;
            ModVerdict::Write
        }
        MemberAction::Ban if state.banned => ModVerdict::Unchanged,
        MemberAction::Ban => ModVerdict::Write,
        MemberAction::Unban if state.banned => ModVerdict::Write,
        MemberAction::Unban => {
            return Err(StoreError::NotFound(format!("{target_name} is not banned from room {room}")))
        }
        MemberAction::Mute | MemberAction::Unmute => {
            state.role.as_ref().ok_or_else(not_member)?;
            if state.muted == (*action == MemberAction::Mute) {
                ModVerdict::Unchanged
            } else {
                ModVerdict::Write
            }
        }
        MemberAction::SetRole(new) => {
            let current = state.role.as_ref().ok_or_else(not_member)?;
            if !role_known {
                return Err(StoreError::NotFound(format!("no role {new} in room {room}")));
            }
            if rank(new) >= rank(actor_role) && actor_role != "owner" {
                return forbidden(format!("you cannot give the role {new}"));
            }
            if current == new {
                ModVerdict::Unchanged
            } else {
                ModVerdict::Write
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(role: &str) -> MemberState {
        MemberState { role: Some(role.into()), ..MemberState::default() }
    }

    fn run(actor_role: &str, action: MemberAction, target: &MemberState) -> Result<ModVerdict> {
        let perms = effective(actor_role, None, false);
        judge(RoomId(1), &action, (UserId(1), actor_role, perms), (UserId(2), "bob", target), true)
    }

    #[test]
    fn ranks_decide_who_acts_on_whom() {
        assert_eq!(run("moderator", MemberAction::Kick, &member("member")).ok(), Some(ModVerdict::Write));
        assert!(run("moderator", MemberAction::Kick, &member("moderator")).is_err());
        assert!(run("moderator", MemberAction::Kick, &member("admin")).is_err());
        assert!(run("admin", MemberAction::SetRole("admin".into()), &member("member")).is_err());
        assert_eq!(
            run("admin", MemberAction::SetRole("moderator".into()), &member("member")).ok(),
            Some(ModVerdict::Write)
        );
        assert_eq!(run("owner", MemberAction::SetRole("owner".into()), &member("admin")).ok(), Some(ModVerdict::Write));
        assert!(run("owner", MemberAction::Kick, &member("owner")).is_err());
        assert!(run("member", MemberAction::Kick, &member("member")).is_err());
    }

    #[test]
    fn muting_takes_posting_away_and_owners_keep_everything() {
        assert!(!effective("member", None, true).contains(Permissions::POST));
        assert!(effective("member", None, true).contains(Permissions::READ));
        let read_only = Permissions::READ;
        assert_eq!(effective("member", Some(read_only), false), read_only);
        assert_eq!(effective("owner", Some(read_only), false), Permissions::EVERYTHING);
        assert_eq!(effective("nobody-defined-this", None, false), Permissions::NONE);
    }

    #[test]
    fn repeats_change_nothing() {
        assert_eq!(run("owner", MemberAction::Invite, &member("member")).ok(), Some(ModVerdict::Unchanged));
        let banned = MemberState { banned: true, ..MemberState::default() };
        assert_eq!(run("owner", MemberAction::Ban, &banned).ok(), Some(ModVerdict::Unchanged));
        assert!(run("owner", MemberAction::Invite, &banned).is_err(), "banned users are not invited");
        assert!(run("owner", MemberAction::Unban, &MemberState::default()).is_err());
    }
}
