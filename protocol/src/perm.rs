//! Permissions: what a member may do in a room, as a set of bits, and the built-in roles.
//!
//! A member's role names a permission set. The built-in roles (`owner`, `admin`, `moderator`,
//! `member`) have the fixed sets below; named custom roles carry their own set. The set is on the
//! wire (as a `u32` bit mask) so that a client can show only what its user may do, but the
//! server checks every request against it; a client's view is never trusted.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A set of permissions (a bit mask; unknown bits are kept and mean nothing to this build).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Permissions(pub u32);

macro_rules! permissions {
    ($($(#[$meta:meta])* $name:ident = $bit:expr, $label:literal;)*) => {
        impl Permissions {
            $($(#[$meta])* pub const $name: Permissions = Permissions(1 << $bit);)*

            /// Every permission this build knows, with its name, in bit order.
            pub const ALL_NAMED: &'static [(Permissions, &'static str)] = &[$((Permissions::$name, $label),)*];
        }
    };
}

permissions! {
    /// Read the room's log (SYNC, HISTORY, VIEW, pushes).
    READ = 0, "read";
    /// Post messages and replies.
    POST = 1, "post";
    /// Edit one's own messages.
    EDIT_OWN = 2, "edit_own";
    /// Delete one's own messages.
    DELETE_OWN = 3, "delete_own";
    /// Delete anyone's messages.
    DELETE_ANY = 4, "delete_any";
    /// React to messages.
    REACT = 5, "react";
    /// Pin and unpin messages.
    PIN = 6, "pin";
    /// Invite users.
    INVITE = 7, "invite";
    /// Remove members.
    KICK = 8, "kick";
    /// Remove members for good.
    BAN = 9, "ban";
    /// Stop members from posting.
    MUTE = 10, "mute";
    /// Give members roles and define roles.
    MANAGE_ROLES = 11, "manage_roles";
    /// Create, change and remove channels.
    MANAGE_CHANNELS = 12, "manage_channels";
    /// Share files.
    UPLOAD = 13, "upload";
}

impl Permissions {
    /// No permission.
    pub const NONE: Permissions = Permissions(0);

    /// Every permission (including ones later builds add).
    pub const EVERYTHING: Permissions = Permissions(u32::MAX);

    /// What a plain member may do: take part, but not moderate.
    pub const MEMBER: Permissions = Permissions(
        Permissions::READ.0
            | Permissions::POST.0
            | Permissions::EDIT_OWN.0
            | Permissions::DELETE_OWN.0
            | Permissions::REACT.0
            | Permissions::UPLOAD.0,
    );

    /// A moderator: a member who also keeps order.
    pub const MODERATOR: Permissions = Permissions(
        Permissions::MEMBER.0
            | Permissions::DELETE_ANY.0
            | Permissions::PIN.0
            | Permissions::INVITE.0
            | Permissions::KICK.0
            | Permissions::MUTE.0,
    );

    /// An admin: a moderator who also bans and manages roles and channels.
    pub const ADMIN: Permissions = Permissions(
        Permissions::MODERATOR.0 | Permissions::BAN.0 | Permissions::MANAGE_ROLES.0 | Permissions::MANAGE_CHANNELS.0,
    );

    /// Whether every permission of `other` is in this set.
    pub const fn contains(self, other: Permissions) -> bool {
        self.0 & other.0 == other.0
    }

    /// This set plus `other`.
    pub const fn with(self, other: Permissions) -> Permissions {
        Permissions(self.0 | other.0)
    }

    /// This set without `other`.
    pub const fn without(self, other: Permissions) -> Permissions {
        Permissions(self.0 & !other.0)
    }

    /// The set of a built-in role, `None` for any other name (a custom role).
    pub fn of_builtin(role: &str) -> Option<Permissions> {
        match role {
            "owner" => Some(Permissions::EVERYTHING),
            "admin" => Some(Permissions::ADMIN),
            "moderator" => Some(Permissions::MODERATOR),
            "member" => Some(Permissions::MEMBER),
            _ => None,
        }
    }

    /// The name of a single known permission.
    pub fn name(self) -> Option<&'static str> {
        Permissions::ALL_NAMED.iter().find(|(p, _)| *p == self).map(|(_, n)| *n)
    }

    /// A permission by name (`"post"`, `"delete_any"`, ...).
    pub fn by_name(name: &str) -> Option<Permissions> {
        Permissions::ALL_NAMED.iter().find(|(_, n)| *n == name).map(|(p, _)| *p)
    }
}

impl fmt::Debug for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> =
            Permissions::ALL_NAMED.iter().filter(|(p, _)| self.contains(*p)).map(|(_, n)| *n).collect();
        write!(f, "Permissions({})", names.join("|"))
    }
}

/// The built-in roles, strongest first.
pub const BUILTIN_ROLES: [&str; 4] = ["owner", "admin", "moderator", "member"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_builtin_role_holds_the_one_below() {
        let sets: Vec<Permissions> =
            BUILTIN_ROLES.iter().map(|r| Permissions::of_builtin(r).unwrap_or(Permissions::NONE)).collect();
        for pair in sets.windows(2) {
            assert!(pair[0].contains(pair[1]), "{:?} should hold {:?}", pair[0], pair[1]);
            assert_ne!(pair[0], pair[1]);
        }
        assert!(!Permissions::MEMBER.contains(Permissions::DELETE_ANY));
        assert_eq!(Permissions::of_builtin("custom"), None);
    }

    #[test]
    fn names_round_trip() {
        for (p, n) in Permissions::ALL_NAMED {
            assert_eq!(Permissions::by_name(n), Some(*p));
            assert_eq!(p.name(), Some(*n));
        }
        assert_eq!(Permissions::ALL_NAMED.len(), 14);
    }
}
