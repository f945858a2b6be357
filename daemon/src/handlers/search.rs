//! SEARCH: one page of a room's messages that contain every word of a query, newest first, in
//! their current state, answered with the same `MESSAGE_PAGE` as VIEW.
//!
//! The query is split into words on the loop, by the splitter the stores index with
//! (`chime_storage::search`), so a query with nothing to look for is refused before it costs a
//! read. The read runs on the shared queue; the store checks membership and reads the index, which
//! it keeps in step with posts, edits and deletes in their own transactions.

use super::{actions::message_page, invalid, page_size, Admitted, Ctx};
use crate::work::{refuse, reply, store_error, Actor, Effect, ReplyTo, Settings, SharedWork, Work};
use chime_protocol::{ErrorBody, Search, ServerFrame};
use chime_storage::{search, RoomId, Seq, SharedStore};

/// Admits SEARCH: 1 to 16 words of at most 100 bytes, in at most 1,024 bytes.
pub fn search(ctx: &mut Ctx<'_>, s: Search) -> Result<Admitted, ErrorBody> {
    let words = search::parse_query(&s.query).map_err(invalid)?;
    let job = SearchJob {
        to: ctx.to,
        actor: ctx.who.actor.clone(),
        room: s.room,
        words,
        before: s.before,
        limit: page_size(s.limit),
    };
    Ok(Admitted::Work(Work::Shared(Box::new(job))))
}

/// A page of search results.
struct SearchJob {
    to: ReplyTo,
    actor: Actor,
    room: RoomId,
    /// The query's words, as the store takes them.
    words: Vec<String>,
    before: Seq,
    limit: u32,
}

impl SharedWork for SearchJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, _settings: &Settings) -> Vec<Effect> {
        match store.search(self.room, self.actor.user_id, &self.words, self.before, self.limit) {
            Ok(found) => vec![reply(self.to, ServerFrame::MessagePage(message_page(self.room, found, self.limit)))],
            Err(e) => vec![refuse(self.to, store_error(&e))],
        }
    }
}
