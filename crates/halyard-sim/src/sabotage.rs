//! Faults injected into what the simulation observes, each breaking one invariant on
//! purpose: the tests use them to show that every check can fail.

/// Which invariant to break.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sabotage {
    /// The persistent subscribers' deliveries are not recorded: acknowledged loss.
    LoseDeliveries,
    /// One QoS 2 delivery is recorded twice.
    DeliverQos2Twice,
    /// `sub1`'s live connection is also reported on another node.
    SecondOwner,
    /// One node's route table digest is altered.
    SkewRoutes,
}
