//! Packet splicing (issue 23, in progress; not yet a `--dataplane` value):
//! once both connections of the proxy exist and are quiescent, a tc program
//! rewrites each packet of one connection into the other, so neither of
//! the proxy's TCP stacks touches the bytes. [`program`]: the kernel
//! program and its flow map, and its packet-by-packet test entry;
//! [`rewrite`]: each direction's rewrite from the two sockets' state;
//! [`repair`]: reading that state from a live socket in repair mode.
//!
//! What the switch can read from a live socket, and why `TCP_REPAIR` alone
//! does not silence it: docs/kernel-notes.md, *A live socket, for packet
//! splicing*.

pub mod program;
pub mod repair;
pub mod rewrite;
