//! WATCH_PRESENCE: the presence of the users a client shows, and pushes when it changes.
//!
//! Live presence (online, away) is the core's, in memory. "Last seen" of a user who is offline
//! must outlive a restart, so it comes from the store: the latest last use of the user's sessions,
//! which the daemon writes when a connection closes (batched, `touch_sessions`), never per
//! message. So the request reads that on a worker (one indexed lookup per user) and the core,
//! given [`Effect::Watched`], registers the watch and answers, preferring what it saw itself.

use super::{invalid, Admitted, Ctx};
use crate::work::{refuse, store_error, Effect, ReplyTo, Settings, SharedWork, Work};
use chime_protocol::{ErrorBody, WatchPresence};
use chime_storage::{SharedStore, UserId};

/// Admits WATCH_PRESENCE: at most `MAX_WATCHED` users.
pub fn watch(ctx: &mut Ctx<'_>, w: WatchPresence) -> Result<Admitted, ErrorBody> {
    if w.users.len() > crate::core::presence::MAX_WATCHED {
        return Err(invalid(format!("watch at most {} users", crate::core::presence::MAX_WATCHED)));
    }
    Ok(Admitted::Work(Work::Shared(Box::new(WatchJob { to: ctx.to, users: w.users }))))
}

/// Reads the stored last seen of the users watched.
struct WatchJob {
    to: ReplyTo,
    users: Vec<UserId>,
}

impl SharedWork for WatchJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, _settings: &Settings) -> Vec<Effect> {
        match store.last_seen(&self.users) {
            Ok(seen) => vec![Effect::Watched { to: self.to, users: self.users, seen }],
            Err(e) => vec![refuse(self.to, store_error(&e))],
        }
    }
}
