//! End-to-end tests: a real `chimed` (built by `cargo build --workspace`) driven over the wire by
//! the blocking client, raw sockets and the real `chime` CLI. Every scenario runs once on the
//! embedded SQLite store and once on PostgreSQL (`CHIME_SKIP_PG=1` skips the latter).

#[macro_use]
#[path = "e2e/util.rs"]
mod util;

#[path = "e2e/accounts.rs"]
mod accounts;
#[path = "e2e/auth.rs"]
mod auth;
#[path = "e2e/chat.rs"]
mod chat;
#[path = "e2e/crash.rs"]
mod crash;
#[path = "e2e/direct.rs"]
mod direct;
#[path = "e2e/files.rs"]
mod files;
#[path = "e2e/hardening.rs"]
mod hardening;
#[path = "e2e/hostile.rs"]
mod hostile;
#[path = "e2e/idempotency.rs"]
mod idempotency;
#[path = "e2e/idle.rs"]
mod idle;
#[path = "e2e/invites.rs"]
mod invites;
#[path = "e2e/membership.rs"]
mod membership;
#[path = "e2e/messages.rs"]
mod messages;
#[path = "e2e/moderation.rs"]
mod moderation;
#[path = "e2e/notify.rs"]
mod notify;
#[path = "e2e/ordering.rs"]
mod ordering;
#[path = "e2e/outage.rs"]
mod outage;
#[path = "e2e/presence.rs"]
mod presence;
#[path = "e2e/receipts.rs"]
mod receipts;
#[path = "e2e/restore.rs"]
mod restore;
#[path = "e2e/search.rs"]
mod search;
#[path = "e2e/secret.rs"]
mod secret;
#[path = "e2e/servers.rs"]
mod servers;
#[path = "e2e/sessions.rs"]
mod sessions;
#[path = "e2e/shutdown.rs"]
mod shutdown;
#[path = "e2e/slow_consumer.rs"]
mod slow_consumer;
#[path = "e2e/sync_race.rs"]
mod sync_race;
#[path = "e2e/tls.rs"]
mod tls;
#[path = "e2e/wire.rs"]
mod wire;
