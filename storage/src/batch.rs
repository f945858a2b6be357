//! The part of a group commit that both stores share: given what the database says about each
//! post (is its author a member, was its key written before) and each room's head, decide every
//! post's outcome and seq. Keeping this in one place is what makes the two stores agree.

use std::collections::HashMap;

use crate::{DeltaRecord, NewPost, PostOutcome, RecordKind, RoomId, Seq, UserId};

/// What the database knows about one post, read inside the batch's transaction.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Probe {
    /// The author is a member of the room (so the room exists).
    pub member: bool,
    /// The author's role allows posting (and they are not muted).
    pub may_post: bool,
    /// An earlier delta with the same (room, author, key): its seq and time.
    pub existing: Option<(u64, i64)>,
}

/// The decided batch.
pub(crate) struct Plan {
    /// One outcome per post, in input order. `Inserted` ones are the rows to write.
    pub outcomes: Vec<PostOutcome>,
    /// The new head of every room that gets at least one delta.
    pub heads: HashMap<RoomId, u64>,
}

/// Decides a batch. `heads` holds the current `last_seq` of the batch's rooms (a room missing
/// from it does not exist). Seqs within a room follow input order and continue from its head
/// without gaps; a key seen earlier in the same batch is a duplicate of that earlier post.
pub(crate) fn plan(posts: &[NewPost], probes: &[Probe], heads: &HashMap<RoomId, u64>) -> Plan {
    let mut next: HashMap<RoomId, u64> = HashMap::new();
    let mut seen: HashMap<(RoomId, UserId, &str), (u64, i64)> = HashMap::new();
    let mut outcomes = Vec::with_capacity(posts.len());
    for (post, probe) in posts.iter().zip(probes) {
        let head = match heads.get(&post.room) {
            Some(head) if probe.member => *head,
            _ => {
                outcomes.push(PostOutcome::NotMember);
                continue;
            }
        };
        if !probe.may_post {
            outcomes.push(PostOutcome::Forbidden);
            continue;
        }
        let keyed = !post.idempotency_key.is_empty();
        let key = (post.room, post.author_id, post.idempotency_key.as_str());
        let earlier = probe.existing.or_else(|| seen.get(&key).copied()).filter(|_| keyed);
        if let Some((seq, ts_ms)) = earlier {
            outcomes.push(PostOutcome::Duplicate { seq: Seq(seq), ts_ms });
            continue;
        }
        let last = next.entry(post.room).or_insert(head);
        *last += 1;
        if keyed {
            seen.insert(key, (*last, post.now_ms));
        }
        outcomes.push(PostOutcome::Inserted(DeltaRecord {
            room: post.room,
            seq: Seq(*last),
            kind: RecordKind::MESSAGE,
            author_id: post.author_id,
            author: post.author.clone(),
            ts_ms: post.now_ms,
            body: post.text.clone(),
            target: None,
        }));
    }
    Plan { outcomes, heads: next }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(room: u64, author: u64, key: &str) -> NewPost {
        NewPost {
            room: RoomId(room),
            author_id: UserId(author),
            author: format!("u{author}"),
            idempotency_key: key.into(),
            text: format!("{room}/{author}/{key}"),
            now_ms: 1000,
        }
    }

    fn seqs(plan: &Plan) -> Vec<Option<u64>> {
        plan.outcomes
            .iter()
            .map(|o| match o {
                PostOutcome::Inserted(d) => Some(d.seq.get()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn seqs_follow_input_order_per_room() {
        let posts = [post(1, 1, "a"), post(2, 1, "a"), post(1, 1, "b"), post(2, 1, "")];
        let probes = [Probe { member: true, may_post: true, existing: None }; 4];
        let heads = HashMap::from([(RoomId(1), 5), (RoomId(2), 0)]);
        let plan = plan(&posts, &probes, &heads);
        assert_eq!(seqs(&plan), [Some(6), Some(1), Some(7), Some(2)]);
        assert_eq!(plan.heads, HashMap::from([(RoomId(1), 7), (RoomId(2), 2)]));
    }

    #[test]
    fn duplicates_and_non_members_take_no_seq() {
        let posts = [post(1, 1, "a"), post(1, 1, "a"), post(1, 2, "x"), post(1, 1, "old"), post(9, 1, "z")];
        let member = Probe { member: true, may_post: true, existing: None };
        let probes = [
            member,
            member,
            Probe { member: false, may_post: false, existing: None },
            Probe { member: true, may_post: true, existing: Some((3, 77)) },
            member,
        ];
        let plan = plan(&posts, &probes, &HashMap::from([(RoomId(1), 4)]));
        assert_eq!(plan.outcomes[1], PostOutcome::Duplicate { seq: Seq(5), ts_ms: 1000 });
        assert_eq!(plan.outcomes[2], PostOutcome::NotMember);
        assert_eq!(plan.outcomes[3], PostOutcome::Duplicate { seq: Seq(3), ts_ms: 77 });
        // Room 9 does not exist, whatever the probe said.
        assert_eq!(plan.outcomes[4], PostOutcome::NotMember);
        assert_eq!(plan.heads, HashMap::from([(RoomId(1), 5)]));
    }

    #[test]
    fn empty_keys_never_collide() {
        let posts = [post(1, 1, ""), post(1, 1, "")];
        let probes = [Probe { member: true, may_post: true, existing: Some((1, 1)) }; 2];
        let plan = plan(&posts, &probes, &HashMap::from([(RoomId(1), 1)]));
        assert_eq!(seqs(&plan), [Some(2), Some(3)]);
    }
}
