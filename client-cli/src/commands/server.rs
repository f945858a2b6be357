//! `server create|join|leave|role|define-role|invite|ban`, `servers` and `channel create`.

use super::room::{parse_permissions, permission_names};
use crate::connect::{CallError, Ctx};
use chime_protocol::{CreateChannel, ServerId, ServerInfo};
use serde_json::{json, Value};

fn server_json(s: &ServerInfo) -> Value {
    json!({
        "server": s.server,
        "name": s.name,
        "description": s.description,
        "public": s.public,
        "owner_id": s.owner,
        "members": s.members,
        "member_cap": s.member_cap,
        "role": s.role,
        "channels": s.channels.iter().map(|c| json!({"room": c.room, "name": c.name})).collect::<Vec<_>>(),
    })
}

fn server_human(s: &ServerInfo, what: &str) -> String {
    let channels: Vec<String> = s.channels.iter().map(|c| format!("#{} {}", c.room, c.name)).collect();
    let mut line = format!(
        "{what}server {} {} ({} member{}, you are {})",
        s.server,
        s.name,
        s.members,
        if s.members == 1 { "" } else { "s" },
        s.role
    );
    if !channels.is_empty() {
        line.push_str(&format!(": {}", channels.join(", ")));
    }
    line
}

/// `server create NAME [--private] [--description D]`.
pub fn create(ctx: &mut Ctx, name: &str, description: &str, public: bool) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    let s = client.create_server(name, description, public)?;
    ctx.out.record(&server_json(&s), &server_human(&s, "created "))?;
    Ok(())
}

/// `server join SERVER`.
pub fn join(ctx: &mut Ctx, server: u64) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    let s = client.join_server(ServerId(server))?;
    ctx.out.record(&server_json(&s), &server_human(&s, "joined "))?;
    Ok(())
}

/// `server leave SERVER`.
pub fn leave(ctx: &mut Ctx, server: u64) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    client.leave_server(ServerId(server))?;
    ctx.out.record(&json!({"server": server}), &format!("left server {server}"))?;
    Ok(())
}

/// `servers`: every server the user is in, page by page.
pub fn list(ctx: &mut Ctx) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    let mut after = ServerId(0);
    loop {
        let page = client.list_servers(after, 0)?;
        for s in &page.servers {
            ctx.out.record(&server_json(s), &server_human(s, ""))?;
        }
        match page.next_after {
            Some(next) if next > after => after = next,
            _ => return Ok(()),
        }
    }
}

/// `channel create SERVER NAME [--voice] [--read-roles R,..] [--post-roles R,..]`.
pub fn create_channel(
    ctx: &mut Ctx,
    server: u64,
    name: &str,
    voice: bool,
    read_roles: Vec<String>,
    post_roles: Vec<String>,
) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    let body = CreateChannel { server: ServerId(server), name: name.to_string(), voice, read_roles, post_roles };
    let info = client.create_channel(body)?;
    ctx.out.record(
        &json!({"room": info.room, "server": server, "name": info.name, "voice": voice}),
        &format!("created channel #{} {} in server {server}", info.room, info.name),
    )?;
    Ok(())
}

/// `server role SERVER USER ROLE`.
pub fn role(ctx: &mut Ctx, server: u64, user: &str, role: &str) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    client.set_server_role(ServerId(server), user, role)?;
    ctx.out.record(
        &json!({"server": server, "user": user, "role": role}),
        &format!("{user} is now {role} in server {server}"),
    )?;
    Ok(())
}

/// `server invite SERVER USER`, `server ban SERVER USER [--remove]`.
pub fn moderate(ctx: &mut Ctx, server: u64, user: &str, action: chime_protocol::ModAction) -> Result<(), CallError> {
    let (mut client, _) = ctx.connect_authed()?;
    client.moderate_server(ServerId(server), user, action)?;
    let verb = action.name().map_or_else(|| action.0.to_string(), str::to_ascii_lowercase);
    ctx.out.record(
        &json!({"server": server, "user": user, "action": verb}),
        &format!("{verb}: {user} in server {server}"),
    )?;
    Ok(())
}

/// `server define-role SERVER NAME PERMISSION... | --remove`.
pub fn define_role(ctx: &mut Ctx, server: u64, name: &str, permissions: Option<&[String]>) -> Result<(), CallError> {
    let perms = parse_permissions(permissions)?;
    let (mut client, _) = ctx.connect_authed()?;
    client.define_server_role(ServerId(server), name, perms)?;
    let listed = permission_names(perms);
    ctx.out.record(
        &json!({"server": server, "role": name, "permissions": perms.map(|_| listed.clone())}),
        &match perms {
            Some(_) => format!("role {name} in server {server}: {}", listed.join(" ")),
            None => format!("role {name} in server {server} removed"),
        },
    )?;
    Ok(())
}
