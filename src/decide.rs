//! `decide(&Snapshot, &Request, now) -> Decision`: the pure core. No I/O, no locks,
//! no tonic types. The gRPC layer loads the current [`Snapshot`] once per request and
//! converts the [`Decision`].

use std::sync::Arc;
use std::time::SystemTime;

use crate::decision::{Decision, DenyReason, Request};
use crate::keys::KeySnapshot;

/// Everything a decision reads, swapped in whole (keys by refresh tasks, the rest by reloads).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub keys: Arc<KeySnapshot>,
}

pub fn decide(_snapshot: &Snapshot, _req: &Request<'_>, _now: SystemTime) -> Decision {
    // Placeholder while the pipeline is written; replaced in the next commit.
    Decision::deny(DenyReason::NoRoute, "no route matches this request")
}
