//! In-memory tests of the core (written next).
