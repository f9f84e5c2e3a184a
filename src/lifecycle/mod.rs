//! The registry's day-2 chores: what is stored (`ls`), deleting a tag or a manifest
//! (`rm`), retention (`prune`), and immutable tags.
//!
//! ```text
//! rules      [[retention]] and [[immutable]]: which tags go, which never move
//! immutable  the check at the gate (both modes): a push may not move an immutable
//!            tag, a delete may not remove one
//! view       what the commands work on, behind one interface: the local store, or
//!            any registry over its API (--url)
//! ops        ls, rm and prune, written once over a view
//! cli        the subcommands: where they work, how they print; the scheduled prune
//! ```

pub mod cli;
pub mod immutable;
pub mod ops;
pub mod rules;
pub mod view;
