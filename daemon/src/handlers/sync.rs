//! SYNC, and the page reads behind it, behind catch-ups and behind HISTORY.
//!
//! SYNC itself needs no job: it starts the connection's sync state machine (`crate::sync`), which
//! asks for page reads ([`FetchJob`]) as the client drains what it was sent; their results come
//! back as [`Effect::Page`] / [`Effect::PageFailed`] for the machine. HISTORY is the same read,
//! answered directly as one DELTA_PAGE.

use super::{invalid, Admitted, Ctx};
use crate::limits::{MAX_SYNC_ROOMS, PAGE_TEXT_BUDGET};
use crate::sync::FetchId;
use crate::work::{reply, Actor, Effect, PageFailure, ReplyTo, Settings, SharedWork};
use chime_protocol::{DeltaPage, ErrorBody, ErrorCode, ServerFrame, Sync};
use chime_storage::{DeltaRecord, RoomId, Seq, SharedStore};

/// Admits SYNC: at most 1,000 rooms; starts (or extends) the connection's sync state.
pub fn start(ctx: &mut Ctx<'_>, s: Sync) -> Result<Admitted, ErrorBody> {
    if s.rooms.len() > MAX_SYNC_ROOMS {
        return Err(invalid(format!("at most {MAX_SYNC_ROOMS} rooms per SYNC")));
    }
    let sync = ctx.sync.get_or_insert_with(Default::default);
    Ok(Admitted::Sync(sync.start(ctx.to.request_id, &s.rooms, s.page_size)))
}

/// Cuts a page of deltas to [`PAGE_TEXT_BUDGET`] bytes of text (always keeping the first delta,
/// which fits a frame on its own), so that a page of long messages still fits a frame; returns
/// whether it cut anything.
pub fn cut_to_budget(deltas: &mut Vec<DeltaRecord>) -> bool {
    let mut budget = 0usize;
    let whole = deltas.len();
    if let Some(cut) = deltas.iter().position(|d| {
        budget += d.body.len() + d.author.len();
        budget > PAGE_TEXT_BUDGET
    }) {
        deltas.truncate(cut.max(1));
    }
    deltas.len() < whole
}

/// Why a page is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// A HISTORY request: the answer is one DELTA_PAGE.
    History,
    /// Fetch `FetchId` of the connection's sync state.
    Sync(FetchId),
}

/// One page of a room's log after a seq, for a member.
pub struct FetchJob {
    to: ReplyTo,
    actor: Actor,
    room: RoomId,
    after: Seq,
    limit: u32,
    purpose: Purpose,
}

impl FetchJob {
    /// A HISTORY read.
    pub fn history(to: ReplyTo, actor: Actor, room: RoomId, after: Seq, limit: u32) -> FetchJob {
        FetchJob { to, actor, room, after, limit, purpose: Purpose::History }
    }

    /// A read for fetch `fetch` of the connection's sync state.
    pub fn sync(to: ReplyTo, actor: Actor, room: RoomId, after: Seq, limit: u32, fetch: FetchId) -> FetchJob {
        FetchJob { to, actor, room, after, limit, purpose: Purpose::Sync(fetch) }
    }

    /// The room, the seq it reads after, and the sync fetch it answers (`None` for HISTORY).
    pub fn what(&self) -> (RoomId, Seq, Option<FetchId>) {
        let fetch = match self.purpose {
            Purpose::History => None,
            Purpose::Sync(f) => Some(f),
        };
        (self.room, self.after, fetch)
    }
}

impl SharedWork for FetchJob {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn reply_to(&self) -> Option<ReplyTo> {
        Some(self.to)
    }

    fn run(self: Box<Self>, store: &mut dyn SharedStore, _settings: &Settings) -> Vec<Effect> {
        let FetchJob { to, actor, room, after, limit, purpose } = *self;
        let failed = |error: ErrorBody, why| match purpose {
            Purpose::History => vec![reply(to, ServerFrame::Error(error))],
            Purpose::Sync(fetch) => vec![Effect::PageFailed { to, room, fetch, why, error }],
        };
        // One read gives both the membership and the head. A room that does not exist is
        // refused like one the user is not in.
        let head = match store.room_details(room, actor.user_id) {
            Ok(Some(d)) if d.role.is_some() => d.room.last_seq,
            Ok(_) => {
                let error = ErrorBody::new(ErrorCode::NOT_MEMBER, format!("not a member of room {room}"));
                return failed(error, PageFailure::NotMember);
            }
            Err(e) => return failed(crate::work::store_error(&e), PageFailure::Store),
        };
        // A cursor past the head would make the client drop every later delta as a duplicate, so it
        // is refused, naming the head. (The head only grows, and a client's cursor can only hold
        // seqs committed before it saw them, so a head read before the page is never too low.)
        if after > head {
            let error = ErrorBody::new(
                ErrorCode::CURSOR_AHEAD,
                format!("cursor {after} is past room {room}'s head {head}; SYNC it again from at most {head}"),
            );
            return failed(error, PageFailure::CursorAhead);
        }
        // One extra row tells whether more follow without a second query.
        let mut deltas = match store.deltas_after(room, after, limit.saturating_add(1)) {
            Ok(d) => d,
            Err(e) => return failed(crate::work::store_error(&e), PageFailure::Store),
        };
        let mut more = deltas.len() > limit as usize;
        deltas.truncate(limit as usize);
        more |= cut_to_budget(&mut deltas);
        let deltas: Vec<_> = deltas.into_iter().map(crate::work::wire_delta).collect();
        match purpose {
            Purpose::History => {
                let resume_after = deltas.last().map_or(after, |d| d.seq);
                vec![reply(to, ServerFrame::DeltaPage(DeltaPage { room, deltas, more, resume_after }))]
            }
            Purpose::Sync(fetch) => vec![Effect::Page { to, room, fetch, deltas, more }],
        }
    }
}
