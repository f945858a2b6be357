//! The settings a user's devices share, as the protocol spells them: which keys exist, the values
//! each takes, their defaults, and the translation between the wire's text and what the store
//! keeps. Pure: `handlers::accounts` checks `SET_SETTING` with [`parse`] on the loop and builds
//! `SETTINGS` pages with [`entries`] on a worker.
//!
//! Two kinds of key (docs/protocol.md, "Profile and settings"):
//!
//! - **account-wide** ones, listed in [`ACCOUNT`] with the values they take and their default;
//!   stored as text rows (only those a user set), so adding one here needs no migration and
//!   changing a default takes effect for everyone who never chose;
//! - **`notify.ROOM`**, the user's notification level in one room they are a member of: `all`
//!   (the default), `mentions` or `none`. Stored on the membership row, so a room's mention
//!   fan-out can read it with the membership, and listed only where it is not the default.
//!
//! Values are matched without regard to ASCII case and answered in the spelling of the table, so
//! every device sees one spelling whatever another device sent.

use chime_protocol::{RoomId, Setting};
use chime_storage::{NotifyLevel, SettingWrite, SettingsRecord};

/// An account-wide setting: its key, the values it takes (the first spelling of each is the one
/// stored and shown), and its default.
#[derive(Debug)]
pub struct AccountSetting {
    /// The key, as on the wire.
    pub key: &'static str,
    /// Every value it takes.
    pub values: &'static [&'static str],
    /// The value of a user who never set it.
    pub default: &'static str,
}

/// The values of a yes/no setting.
const BOOL: &[&str] = &["true", "false"];

/// Every account-wide setting, in the order `SETTINGS` lists them.
pub const ACCOUNT: [AccountSetting; 2] = [
    // Files shared in rooms are fetched as they arrive unless the user turns this off (a metered
    // connection, say).
    AccountSetting { key: "media.auto_load", values: BOOL, default: "true" },
    // Images in full quality unless the user asks for smaller versions.
    AccountSetting { key: "media.low_quality_images", values: BOOL, default: "false" },
];

/// The prefix of per-room notification keys: `notify.` and a room id.
pub const NOTIFY_PREFIX: &str = "notify.";

/// The notification levels as the wire spells them, in stored order.
const LEVELS: [(NotifyLevel, &str); 3] =
    [(NotifyLevel::All, "all"), (NotifyLevel::Mentions, "mentions"), (NotifyLevel::Nothing, "none")];

/// Most characters of a client's key or value repeated in an error message.
const ECHO: usize = 64;

/// A checked `SET_SETTING`: what to store, and how to name it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A room's notification level.
    Notify {
        /// The room.
        room: RoomId,
        /// The level.
        level: NotifyLevel,
    },
    /// An account-wide setting, with the value in the table's spelling.
    Account {
        /// The setting.
        key: &'static str,
        /// The value.
        value: &'static str,
    },
}

impl Change {
    /// What the store writes.
    pub fn write(&self) -> SettingWrite<'static> {
        match *self {
            Change::Notify { room, level } => SettingWrite::Notify { room, level },
            Change::Account { key, value } => SettingWrite::Account { key, value },
        }
    }

    /// The key, as `SETTING` and `SETTING_CHANGED` carry it.
    pub fn key(&self) -> String {
        match *self {
            Change::Notify { room, .. } => notify_key(room),
            Change::Account { key, .. } => key.to_string(),
        }
    }

    /// The value, in the server's spelling.
    pub fn value(&self) -> &'static str {
        match *self {
            Change::Notify { level, .. } => level_name(level),
            Change::Account { value, .. } => value,
        }
    }
}

/// Checks a `SET_SETTING`'s key and value. The error, for `INVALID_ARGUMENT`, names what is
/// allowed. Whether the user is a member of a `notify.ROOM`'s room is the store's to say.
pub fn parse(key: &str, value: &str) -> Result<Change, String> {
    if let Some(room) = key.strip_prefix(NOTIFY_PREFIX) {
        let room = parse_room(room).ok_or_else(|| {
            format!("{} is not a room's key: notify. is followed by a room id such as notify.3", echo(key))
        })?;
        let level = LEVELS
            .iter()
            .find(|(_, name)| name.eq_ignore_ascii_case(value))
            .map(|&(level, _)| level)
            .ok_or_else(|| format!("{key} takes all, mentions or none, not {}", echo(value)))?;
        return Ok(Change::Notify { room, level });
    }
    let Some(setting) = ACCOUNT.iter().find(|s| s.key == key) else {
        let known: Vec<&str> = ACCOUNT.iter().map(|s| s.key).collect();
        return Err(format!("unknown setting {}; the settings are {} and notify.ROOM", echo(key), known.join(", ")));
    };
    match setting.values.iter().find(|v| v.eq_ignore_ascii_case(value)) {
        Some(value) => Ok(Change::Account { key: setting.key, value }),
        None => Err(format!("{} takes {}, not {}", setting.key, setting.values.join(" or "), echo(value))),
    }
}

/// The entries of one `SETTINGS` page: on the first page every account-wide setting, with its
/// default when the user never set it (or the stored value is not one this build knows), then
/// the page's rooms.
pub fn entries(record: &SettingsRecord, first_page: bool) -> Vec<Setting> {
    let mut out = Vec::with_capacity(ACCOUNT.len() + record.notify.len());
    if first_page {
        for setting in &ACCOUNT {
            let stored = record.account.iter().find(|(key, _)| key == setting.key).map(|(_, v)| v.as_str());
            let value = stored.filter(|v| setting.values.contains(v)).unwrap_or(setting.default);
            out.push(Setting { key: setting.key.to_string(), value: value.to_string() });
        }
    }
    for &(room, level) in &record.notify {
        out.push(Setting { key: notify_key(room), value: level_name(level).to_string() });
    }
    out
}

/// `notify.ROOM`.
fn notify_key(room: RoomId) -> String {
    format!("{NOTIFY_PREFIX}{room}")
}

/// A level's wire name.
fn level_name(level: NotifyLevel) -> &'static str {
    LEVELS.iter().find(|(l, _)| *l == level).map_or("all", |&(_, name)| name)
}

/// A room id in a key: decimal digits only (no sign, no spaces), not 0 (never a room).
fn parse_room(digits: &str) -> Option<RoomId> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok().filter(|&id| id != 0).map(RoomId)
}

/// A client's text in an error message: quoted, and cut after [`ECHO`] characters so that the
/// message stays small whatever was sent.
fn echo(text: &str) -> String {
    let mut shown: String = text.chars().take(ECHO).collect();
    if shown.len() < text.len() {
        shown.push('…');
    }
    format!("{shown:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_settings_take_their_values_in_any_case_and_answer_in_one_spelling() {
        let c = parse("media.auto_load", "FALSE").expect("valid");
        assert_eq!(c, Change::Account { key: "media.auto_load", value: "false" });
        assert_eq!((c.key().as_str(), c.value()), ("media.auto_load", "false"));
        assert_eq!(c.write(), SettingWrite::Account { key: "media.auto_load", value: "false" });
        let err = parse("media.low_quality_images", "yes").expect_err("not a bool");
        assert_eq!(err, "media.low_quality_images takes true or false, not \"yes\"");
        let err = parse("media.autoload", "true").expect_err("unknown");
        assert!(err.contains("media.auto_load, media.low_quality_images and notify.ROOM"), "{err}");
    }

    #[test]
    fn notify_keys_name_a_room_and_a_level() {
        let c = parse("notify.300", "Mentions").expect("valid");
        assert_eq!(c, Change::Notify { room: RoomId(300), level: NotifyLevel::Mentions });
        assert_eq!((c.key().as_str(), c.value()), ("notify.300", "mentions"));
        assert_eq!(parse("notify.1", "none").expect("valid").value(), "none");
        for bad in
            ["notify.", "notify.0", "notify.+3", "notify.-3", "notify.3x", "notify. 3", "notify.99999999999999999999"]
        {
            assert!(parse(bad, "all").is_err(), "{bad}");
        }
        let err = parse("notify.3", "some").expect_err("bad level");
        assert_eq!(err, "notify.3 takes all, mentions or none, not \"some\"");
    }

    #[test]
    fn errors_repeat_at_most_a_little_of_what_was_sent() {
        let err = parse(&"k".repeat(100_000), "v").expect_err("unknown");
        assert!(err.len() < 300, "{} bytes", err.len());
        let err = parse("media.auto_load", &"v".repeat(100_000)).expect_err("bad value");
        assert!(err.len() < 300 && err.contains('…'), "{err}");
    }

    #[test]
    fn the_first_page_fills_in_defaults_and_later_pages_only_list_rooms() {
        let record = SettingsRecord {
            version: 4,
            account: vec![
                ("media.low_quality_images".into(), "true".into()),
                // A value this build does not know (a newer build's) reads as the default.
                ("media.auto_load".into(), "sometimes".into()),
                ("some.future_key".into(), "x".into()),
            ],
            notify: vec![(RoomId(3), NotifyLevel::Nothing), (RoomId(8), NotifyLevel::Mentions)],
        };
        let pairs = |v: Vec<Setting>| v.into_iter().map(|s| (s.key, s.value)).collect::<Vec<_>>();
        let owned = |v: &[(&str, &str)]| v.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
        assert_eq!(
            pairs(entries(&record, true)),
            owned(&[
                ("media.auto_load", "true"),
                ("media.low_quality_images", "true"),
                ("notify.3", "none"),
                ("notify.8", "mentions"),
            ])
        );
        assert_eq!(pairs(entries(&record, false)), owned(&[("notify.3", "none"), ("notify.8", "mentions")]));
        let fresh = SettingsRecord::default();
        assert_eq!(
            pairs(entries(&fresh, true)),
            owned(&[("media.auto_load", "true"), ("media.low_quality_images", "false")])
        );
    }
}
