//! `room create|join|leave|info`, `rooms` and `members`.

use crate::connect::{CallError, Ctx};
use chime_protocol::RoomId;
use serde_json::json;

/// `room create NAME`: a group room owned by the caller.
pub fn create(ctx: &mut Ctx, name: &str) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    let info = client.create_room(name)?;
    ctx.out.record(
        &json!({"room": info.room, "name": info.name}),
        &format!("created room #{} {}", info.room, info.name),
    )?;
    Ok(())
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
    for member in client.members(RoomId(room))? {
        ctx.out.record(
            &json!({"room": room, "user": member.user, "user_id": member.user_id, "role": member.role}),
            &format!("{} (user {}) {}", member.user, member.user_id, member.role),
        )?;
    }
    Ok(())
}
