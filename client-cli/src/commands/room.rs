//! `room create|join|leave|info|invite|kick|ban|mute|role|define-role`, `dm`, `rooms` and `members`.

use crate::connect::{CallError, Ctx};
use chime_protocol::{ModAction, Permissions, RoomId, RoomKind};
use serde_json::json;

/// `room create NAME [--private | --secret]`: a group room owned by the caller.
pub fn create(ctx: &mut Ctx, name: &str, private: bool, secret: bool) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    let kind = match (private, secret) {
        (_, true) => RoomKind::SECRET,
        (true, false) => RoomKind::PRIVATE,
        (false, false) => RoomKind::GROUP,
    };
    let info = client.create_room_of(name, kind)?;
    let kind_name = kind.name().map_or_else(|| kind.0.to_string(), str::to_ascii_lowercase);
    ctx.out.record(
        &json!({"room": info.room, "name": info.name, "kind": kind_name}),
        &format!("created room #{} {} ({kind_name})", info.room, info.name),
    )?;
    Ok(())
}

/// `room invite|kick|ban|mute|role ROOM USER ...`.
pub fn moderate(ctx: &mut Ctx, room: u64, user: &str, action: ModAction, role: &str) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    let posted = client.moderate(RoomId(room), user, action, role)?;
    let verb = action.name().map_or_else(|| action.0.to_string(), str::to_ascii_lowercase);
    let note = if posted.duplicate { " (nothing to change)" } else { "" };
    if action == ModAction::SET_ROLE {
        ctx.out.record(
            &json!({"room": room, "user": user, "role": role, "seq": posted.seq}),
            &format!("{user} is now {role} in #{room}{note}"),
        )?;
    } else {
        ctx.out.record(
            &json!({"room": room, "user": user, "seq": posted.seq}),
            &format!("{verb}: {user} in #{room}{note}"),
        )?;
    }
    Ok(())
}

/// `room define-role ROOM NAME PERMISSION... | --remove`.
pub fn define_role(ctx: &mut Ctx, room: u64, name: &str, permissions: Option<&[String]>) -> Result<(), CallError> {
    let perms = parse_permissions(permissions)?;
    let (mut client, _) = ctx.connect_authed()?;
    let posted = client.define_role(RoomId(room), name, perms)?;
    let listed = permission_names(perms);
    ctx.out.record(
        &json!({"room": room, "role": name, "permissions": perms.map(|_| listed.clone()), "seq": posted.seq}),
        &match perms {
            Some(_) => format!("role {name} in #{room}: {}", listed.join(" ")),
            None => format!("role {name} in #{room} removed"),
        },
    )?;
    Ok(())
}

/// Permission names to a set (`None` stays none: a removal).
pub fn parse_permissions(names: Option<&[String]>) -> Result<Option<Permissions>, CallError> {
    let Some(names) = names else { return Ok(None) };
    let mut set = Permissions::NONE;
    for n in names {
        let p = Permissions::by_name(n).ok_or_else(|| {
            let known: Vec<&str> = Permissions::ALL_NAMED.iter().map(|(_, n)| *n).collect();
            CallError::Local(anyhow::anyhow!("unknown permission {n:?}; known: {}", known.join(" ")))
        })?;
        set = set.with(p);
    }
    Ok(Some(set))
}

/// A set's permission names, in bit order.
pub fn permission_names(perms: Option<Permissions>) -> Vec<&'static str> {
    perms
        .map(|p| Permissions::ALL_NAMED.iter().filter(|(q, _)| p.contains(*q)).map(|(_, n)| *n).collect())
        .unwrap_or_default()
}

/// `dm USER`: the direct dialog with USER, made on first use.
pub fn direct(ctx: &mut Ctx, user: &str) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    let info = client.open_direct(user)?;
    ctx.out.record(
        &json!({"room": info.room, "name": info.name}),
        &format!("direct dialog #{} ({})", info.room, info.name),
    )?;
    Ok(())
}

/// `room join ROOM`.
pub fn join(ctx: &mut Ctx, room: u64) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    let info = client.join_room(RoomId(room))?;
    ctx.out.record(&json!({"room": info.room}), &format!("joined room #{} {}", info.room, info.name))?;
    Ok(())
}

/// `room leave ROOM`.
pub fn leave(ctx: &mut Ctx, room: u64) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    client.leave_room(RoomId(room))?;
    ctx.out.record(&json!({"room": room}), &format!("left room #{room}"))?;
    Ok(())
}

/// `room info ROOM`: its name, kind, head seq, member count and the caller's role.
pub fn info(ctx: &mut Ctx, room: u64) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    let d = client.get_room(RoomId(room))?;
    let kind = d.info.kind.name().map_or_else(|| d.info.kind.0.to_string(), str::to_ascii_lowercase);
    ctx.out.record(
        &json!({
            "room": d.info.room,
            "name": d.info.name,
            "kind": kind,
            "head": d.info.head_seq,
            "members": d.members,
            "role": d.role,
        }),
        &format!(
            "#{} {} ({kind}): latest seq {}, {} member{}, you are {}",
            d.info.room,
            d.info.name,
            d.info.head_seq,
            d.members,
            if d.members == 1 { "" } else { "s" },
            d.role
        ),
    )?;
    Ok(())
}

/// `rooms`: one record per room the caller is in, by id.
pub fn list(ctx: &mut Ctx) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    let mut rooms = client.list_rooms()?;
    rooms.sort_by_key(|r| r.room);
    for info in rooms {
        ctx.out.record(
            &json!({"room": info.room, "name": info.name, "head_seq": info.head_seq}),
            &format!("#{} {} (latest seq {})", info.room, info.name, info.head_seq),
        )?;
    }
    Ok(())
}

/// `members ROOM`: one record per member.
pub fn members(ctx: &mut Ctx, room: u64) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    let members = client.members(RoomId(room))?;
    // Presence is asked for the members shown, 500 at a time, as a client showing a list would.
    for chunk in members.chunks(500) {
        let presence = client.watch_presence(chunk.iter().map(|m| m.user_id).collect())?;
        for (member, p) in chunk.iter().zip(&presence.entries) {
            let status = p.status.name().map_or_else(|| p.status.0.to_string(), str::to_ascii_lowercase);
            let seen = (p.last_seen_ms > 0).then(|| crate::output::rfc3339_ms(p.last_seen_ms));
            ctx.out.record(
                &json!({
                    "room": room, "user": member.user, "user_id": member.user_id, "role": member.role,
                    "presence": status, "last_seen": seen,
                }),
                &format!("{} (user {}) {}, {status}", member.user, member.user_id, member.role),
            )?;
        }
    }
    Ok(())
}
