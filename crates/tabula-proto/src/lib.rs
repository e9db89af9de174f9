//! The gRPC channel between controller and agents: `proto/tabula/v1/control.proto`, compiled
//! at build time by protox (no system `protoc`), and conversions to and from the
//! transport-free messages of `tabula-api`.
//!
//! Conversions from the wire are fallible: an agent or controller must never trust that the
//! other side sent a well-formed table (a range with `begin > end`, an unknown state).

#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("tabula.v1");
}

use tabula_api::{
    Command, ContainerLocation, ControlError, CowCopy, Fault, FaultOp, RangeUpdate, TableSnapshot,
};
use tabula_core::{ContainerId, Entry, Generation, Phys, State, VdiskId};

/// A message from the other side that does not make sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed message from the peer: {0}")]
pub struct Malformed(pub String);

fn bad(what: impl Into<String>) -> Malformed {
    Malformed(what.into())
}

// ---- states and entries ----

pub fn state_to_pb(s: State) -> pb::State {
    match s {
        State::Normal => pb::State::Normal,
        State::Zero => pb::State::Zero,
        State::Invalid => pb::State::Invalid,
        State::NoWrite => pb::State::NoWrite,
        State::New => pb::State::New,
        State::Error => pb::State::Error,
    }
}

pub fn state_from_pb(v: i32) -> Result<State, Malformed> {
    Ok(
        match pb::State::try_from(v).map_err(|_| bad(format!("unknown state {v}")))? {
            pb::State::Normal => State::Normal,
            pb::State::Zero => State::Zero,
            pb::State::Invalid => State::Invalid,
            pb::State::NoWrite => State::NoWrite,
            pb::State::New => State::New,
            pb::State::Error => State::Error,
        },
    )
}

pub fn entry_to_pb(e: &Entry) -> pb::Entry {
    pb::Entry {
        begin: e.begin,
        end: e.end,
        target: e.target.map(|t| pb::Phys {
            container: t.container.0,
            block: t.block,
        }),
        state: state_to_pb(e.state) as i32,
    }
}

pub fn entry_from_pb(e: &pb::Entry) -> Result<Entry, Malformed> {
    if e.begin >= e.end {
        return Err(bad(format!(
            "entry with empty range {}..{}",
            e.begin, e.end
        )));
    }
    Ok(Entry {
        begin: e.begin,
        end: e.end,
        target: e.target.map(|t| Phys {
            container: ContainerId(t.container),
            block: t.block,
        }),
        state: state_from_pb(e.state)?,
    })
}

fn entries_from_pb(v: &[pb::Entry]) -> Result<Vec<Entry>, Malformed> {
    v.iter().map(entry_from_pb).collect()
}

fn phys_from_pb(p: &pb::Phys) -> Phys {
    Phys {
        container: ContainerId(p.container),
        block: p.block,
    }
}

pub fn cow_to_pb(c: &CowCopy) -> pb::CowCopy {
    pb::CowCopy {
        segment: c.segment,
        from: c.from.iter().map(entry_to_pb).collect(),
        to: Some(pb::Phys {
            container: c.to.container.0,
            block: c.to.block,
        }),
    }
}

pub fn cow_from_pb(c: &pb::CowCopy) -> Result<CowCopy, Malformed> {
    let from = entries_from_pb(&c.from)?;
    if from.iter().any(|e| e.target.is_none()) {
        return Err(bad(format!(
            "copy for segment {} names an unmapped source",
            c.segment
        )));
    }
    Ok(CowCopy {
        segment: c.segment,
        from,
        to: phys_from_pb(
            c.to.as_ref()
                .ok_or_else(|| bad(format!("copy for segment {} has no target", c.segment)))?,
        ),
    })
}

// ---- tables ----

pub fn snapshot_to_pb(s: &TableSnapshot) -> pb::TableSnapshot {
    pb::TableSnapshot {
        vdisk: s.vdisk.0,
        name: s.name.clone(),
        size_bytes: s.size_bytes,
        segment_blocks: s.segment_blocks,
        generation: s.generation.0,
        read_only: s.read_only,
        entries: s.entries.iter().map(entry_to_pb).collect(),
        // The controller's gRPC service sets its epoch on what it sends.
        epoch: 0,
    }
}

pub fn snapshot_from_pb(s: pb::TableSnapshot) -> Result<TableSnapshot, Malformed> {
    if s.segment_blocks == 0 {
        return Err(bad(format!("table of {} has no segment size", s.name)));
    }
    Ok(TableSnapshot {
        vdisk: VdiskId(s.vdisk),
        entries: entries_from_pb(&s.entries)?,
        name: s.name,
        size_bytes: s.size_bytes,
        segment_blocks: s.segment_blocks,
        generation: Generation(s.generation),
        read_only: s.read_only,
    })
}

pub fn update_to_pb(u: &RangeUpdate) -> pb::RangeUpdate {
    pb::RangeUpdate {
        vdisk: u.vdisk.0,
        generation: u.generation.0,
        begin: u.range.0,
        end: u.range.1,
        entries: u.entries.iter().map(entry_to_pb).collect(),
        change: u.change,
        copies: u.copies.iter().map(cow_to_pb).collect(),
    }
}

pub fn update_from_pb(u: &pb::RangeUpdate) -> Result<RangeUpdate, Malformed> {
    if u.begin > u.end {
        return Err(bad(format!("update of range {}..{}", u.begin, u.end)));
    }
    let entries = entries_from_pb(&u.entries)?;
    if entries.iter().any(|e| e.begin < u.begin || e.end > u.end) {
        return Err(bad(format!(
            "update of {}..{} has entries outside its range",
            u.begin, u.end
        )));
    }
    Ok(RangeUpdate {
        vdisk: VdiskId(u.vdisk),
        generation: Generation(u.generation),
        range: (u.begin, u.end),
        entries,
        change: u.change,
        copies: u.copies.iter().map(cow_from_pb).collect::<Result<_, _>>()?,
    })
}

// ---- commands ----

pub fn command_to_pb(id: u64, c: &Command) -> pb::Command {
    use pb::command::Cmd;
    let cmd = match c {
        Command::Update(u) => Cmd::Update(update_to_pb(u)),
        Command::Allocated(u) => Cmd::Allocated(update_to_pb(u)),
        Command::SetState {
            vdisk,
            generation,
            range,
            state,
        } => Cmd::SetState(pb::SetState {
            vdisk: vdisk.0,
            generation: generation.0,
            begin: range.0,
            end: range.1,
            state: state_to_pb(*state) as i32,
        }),
        Command::Replace(s) => Cmd::Replace(snapshot_to_pb(s)),
        Command::Block { vdisk, timeout_ms } => Cmd::Block(pb::Block {
            vdisk: vdisk.0,
            timeout_ms: *timeout_ms,
        }),
        Command::Unblock { vdisk } => Cmd::Unblock(vdisk.0),
        Command::Detach { vdisk } => Cmd::Detach(vdisk.0),
        Command::ContainerHealth {
            container,
            failed,
            reason,
        } => Cmd::ContainerHealth(pb::ContainerHealth {
            container: container.0,
            failed: *failed,
            reason: reason.clone(),
        }),
    };
    pb::Command {
        id,
        cmd: Some(cmd),
        // The controller's gRPC service sets its epoch on what it sends.
        epoch: 0,
    }
}

pub fn command_from_pb(c: pb::Command) -> Result<(u64, Command), Malformed> {
    use pb::command::Cmd;
    let cmd = match c.cmd.ok_or_else(|| bad("command without a body"))? {
        Cmd::Update(u) => Command::Update(update_from_pb(&u)?),
        Cmd::Allocated(u) => Command::Allocated(update_from_pb(&u)?),
        Cmd::SetState(s) => {
            if s.begin > s.end {
                return Err(bad(format!("set-state of range {}..{}", s.begin, s.end)));
            }
            Command::SetState {
                vdisk: VdiskId(s.vdisk),
                generation: Generation(s.generation),
                range: (s.begin, s.end),
                state: state_from_pb(s.state)?,
            }
        }
        Cmd::Replace(s) => Command::Replace(snapshot_from_pb(s)?),
        Cmd::Block(b) => Command::Block {
            vdisk: VdiskId(b.vdisk),
            timeout_ms: b.timeout_ms,
        },
        Cmd::Unblock(v) => Command::Unblock { vdisk: VdiskId(v) },
        Cmd::Detach(v) => Command::Detach { vdisk: VdiskId(v) },
        Cmd::ContainerHealth(h) => Command::ContainerHealth {
            container: ContainerId(h.container),
            failed: h.failed,
            reason: h.reason,
        },
    };
    Ok((c.id, cmd))
}

// ---- faults ----

pub fn fault_op_to_pb(op: FaultOp) -> pb::FaultOp {
    match op {
        FaultOp::Read => pb::FaultOp::Read,
        FaultOp::Write => pb::FaultOp::Write,
        FaultOp::Trim => pb::FaultOp::Trim,
        FaultOp::WriteZeroes => pb::FaultOp::WriteZeroes,
        FaultOp::Copied => pb::FaultOp::Copied,
    }
}

pub fn fault_to_pb(f: &Fault) -> pb::Fault {
    pb::Fault {
        agent: f.agent.clone(),
        vdisk: f.vdisk.0,
        op: fault_op_to_pb(f.op) as i32,
        segment_begin: f.segments.0,
        segment_end: f.segments.1,
        state: state_to_pb(f.state) as i32,
        generation: f.generation.0,
        copied: f.copied.iter().map(cow_to_pb).collect(),
    }
}

pub fn fault_from_pb(f: pb::Fault) -> Result<Fault, Malformed> {
    let op = match pb::FaultOp::try_from(f.op).map_err(|_| bad(format!("unknown op {}", f.op)))? {
        pb::FaultOp::Read => FaultOp::Read,
        pb::FaultOp::Write => FaultOp::Write,
        pb::FaultOp::Trim => FaultOp::Trim,
        pb::FaultOp::WriteZeroes => FaultOp::WriteZeroes,
        pb::FaultOp::Copied => FaultOp::Copied,
    };
    if f.segment_begin >= f.segment_end {
        return Err(bad(format!(
            "fault on empty segment range {}..{}",
            f.segment_begin, f.segment_end
        )));
    }
    Ok(Fault {
        agent: f.agent,
        vdisk: VdiskId(f.vdisk),
        op,
        segments: (f.segment_begin, f.segment_end),
        state: state_from_pb(f.state)?,
        generation: Generation(f.generation),
        copied: f.copied.iter().map(cow_from_pb).collect::<Result<_, _>>()?,
    })
}

// ---- errors ----

pub fn error_to_pb(e: &ControlError) -> pb::Error {
    use pb::error::Kind;
    let (kind, message, retry_after_ms) = match e {
        ControlError::NoSpace => (Kind::NoSpace, String::new(), 0),
        ControlError::NotFound(m) => (Kind::NotFound, m.clone(), 0),
        ControlError::Exists(m) => (Kind::Exists, m.clone(), 0),
        ControlError::Invalid(m) => (Kind::Invalid, m.clone(), 0),
        ControlError::InUse(m) => (Kind::InUse, m.clone(), 0),
        ControlError::Unavailable(m) => (Kind::Unavailable, m.clone(), 0),
        ControlError::Storage(m) => (Kind::Storage, m.clone(), 0),
        ControlError::Retry { after_ms, reason } => (Kind::Retry, reason.clone(), *after_ms),
    };
    pb::Error {
        kind: kind as i32,
        message,
        retry_after_ms,
    }
}

pub fn error_from_pb(e: pb::Error) -> ControlError {
    use pb::error::Kind;
    match Kind::try_from(e.kind).unwrap_or(Kind::Storage) {
        Kind::NoSpace => ControlError::NoSpace,
        Kind::NotFound => ControlError::NotFound(e.message),
        Kind::Exists => ControlError::Exists(e.message),
        Kind::Invalid => ControlError::Invalid(e.message),
        Kind::InUse => ControlError::InUse(e.message),
        Kind::Unavailable => ControlError::Unavailable(e.message),
        Kind::Storage => ControlError::Storage(e.message),
        Kind::Retry => ControlError::Retry {
            after_ms: e.retry_after_ms,
            reason: e.message,
        },
    }
}

/// Unary calls other than Fault carry a `ControlError` as a gRPC status with the encoded
/// error as its details, so the kind survives the trip.
pub fn error_to_status(e: &ControlError) -> tonic::Status {
    use prost::Message;
    let code = match e {
        ControlError::NoSpace => tonic::Code::ResourceExhausted,
        ControlError::NotFound(_) => tonic::Code::NotFound,
        ControlError::Exists(_) => tonic::Code::AlreadyExists,
        ControlError::InUse(_) => tonic::Code::FailedPrecondition,
        ControlError::Invalid(_) => tonic::Code::InvalidArgument,
        ControlError::Unavailable(_) | ControlError::Retry { .. } => tonic::Code::Unavailable,
        ControlError::Storage(_) => tonic::Code::Internal,
    };
    tonic::Status::with_details(code, e.to_string(), error_to_pb(e).encode_to_vec().into())
}

/// The `ControlError` a status carries; a status without one (a transport failure) means the
/// controller could not be reached.
pub fn error_from_status(s: &tonic::Status) -> ControlError {
    use prost::Message;
    if !s.details().is_empty() {
        if let Ok(e) = pb::Error::decode(s.details()) {
            return error_from_pb(e);
        }
    }
    ControlError::Unavailable(format!("{}: {}", s.code(), s.message()))
}

// ---- leadership ----

/// The metadata key of a standby's "not the leader" answer that carries the leader's URL
/// (its admin/gRPC address, e.g. `http://10.0.0.1:7700`).
pub const LEADER_METADATA: &str = "tabula-leader";

const NOT_LEADER: &str = "not the leader";

/// What a controller that is not the leader answers every `tabula.v1.Control` call with:
/// UNAVAILABLE (the caller tries another controller) and, when it knows one, the leader's
/// URL in the [`LEADER_METADATA`] key for the caller to go to.
pub fn not_leader(leader: Option<&str>) -> tonic::Status {
    let message = match leader {
        Some(l) => format!("{NOT_LEADER}; the leader is at {l}"),
        None => format!(
            "{NOT_LEADER}; no leader is known (an election may be under way): try again or another controller"
        ),
    };
    let mut s = tonic::Status::unavailable(message);
    // A URL that is not a valid header value cannot be passed on; the caller then rotates
    // through its own list.
    if let Some(v) = leader.and_then(|l| tonic::metadata::MetadataValue::try_from(l).ok()) {
        s.metadata_mut().insert(LEADER_METADATA, v);
    }
    s
}

/// The leader's URL a "not the leader" answer carries, if any.
pub fn leader_hint(s: &tonic::Status) -> Option<String> {
    let v = s.metadata().get(LEADER_METADATA)?.to_str().ok()?.trim();
    (!v.is_empty()).then(|| v.to_string())
}

/// Whether `s` is a standby's "not the leader" answer (see [`not_leader`]).
pub fn is_not_leader(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable && s.message().starts_with(NOT_LEADER)
}

pub fn location_to_pb(l: &ContainerLocation) -> pb::ContainerLocation {
    pb::ContainerLocation {
        id: l.id.0,
        name: l.name.clone(),
        path: l.path.clone(),
        size_bytes: l.size_bytes,
        failed: l.failed.clone(),
        pool_id: l.pool_id,
    }
}

pub fn location_from_pb(l: pb::ContainerLocation) -> ContainerLocation {
    ContainerLocation {
        id: ContainerId(l.id),
        name: l.name,
        path: l.path,
        size_bytes: l.size_bytes,
        failed: l.failed,
        pool_id: l.pool_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_entries() -> Vec<Entry> {
        vec![
            Entry {
                begin: 0,
                end: 256,
                target: Some(Phys {
                    container: ContainerId(1),
                    block: 512,
                }),
                state: State::Normal,
            },
            Entry {
                begin: 256,
                end: 300,
                target: None,
                state: State::Error,
            },
        ]
    }

    #[test]
    fn every_command_round_trips() {
        let u = RangeUpdate {
            vdisk: VdiskId(3),
            generation: Generation(9),
            range: (0, 512),
            entries: sample_entries(),
            change: true,
            copies: vec![cow_sample()],
        };
        let snap = TableSnapshot {
            vdisk: VdiskId(3),
            name: "db".into(),
            size_bytes: 1 << 30,
            segment_blocks: 256,
            generation: Generation(9),
            read_only: false,
            entries: sample_entries(),
        };
        let cmds = vec![
            Command::Update(u.clone()),
            Command::Allocated(u),
            Command::SetState {
                vdisk: VdiskId(3),
                generation: Generation(10),
                range: (0, 100),
                state: State::NoWrite,
            },
            Command::Replace(snap),
            Command::Block {
                vdisk: VdiskId(3),
                timeout_ms: 5000,
            },
            Command::Unblock { vdisk: VdiskId(3) },
            Command::Detach { vdisk: VdiskId(3) },
            Command::ContainerHealth {
                container: ContainerId(2),
                failed: true,
                reason: "connection refused".into(),
            },
        ];
        for (i, c) in cmds.into_iter().enumerate() {
            let back = command_from_pb(command_to_pb(i as u64, &c)).unwrap();
            assert_eq!(back, (i as u64, c));
        }
    }

    fn cow_sample() -> CowCopy {
        CowCopy {
            segment: 0,
            from: vec![sample_entries()[0]],
            to: Phys {
                container: ContainerId(2),
                block: 4096,
            },
        }
    }

    #[test]
    fn copy_on_write_fault_round_trips_and_unmapped_sources_are_refused() {
        let f = Fault {
            agent: "a".into(),
            vdisk: VdiskId(3),
            op: FaultOp::Copied,
            segments: (0, 1),
            state: State::New,
            generation: Generation(4),
            copied: vec![cow_sample()],
        };
        assert_eq!(fault_from_pb(fault_to_pb(&f)).unwrap(), f);
        let mut bad = cow_to_pb(&cow_sample());
        bad.from[0].target = None;
        assert!(cow_from_pb(&bad).is_err(), "a copy from nowhere");
        bad = cow_to_pb(&cow_sample());
        bad.to = None;
        assert!(cow_from_pb(&bad).is_err(), "a copy to nowhere");
    }

    #[test]
    fn container_locations_round_trip_with_their_health() {
        for failed in [None, Some("no answer within 5000 ms".to_string())] {
            let l = ContainerLocation {
                id: ContainerId(3),
                name: "c3".into(),
                path: "nbd://10.0.0.5/disk0".into(),
                size_bytes: 1 << 30,
                failed,
                pool_id: 0x1234_5678_9abc_def0,
            };
            assert_eq!(location_from_pb(location_to_pb(&l)), l);
        }
    }

    #[test]
    fn every_error_survives_a_status() {
        for e in [
            ControlError::NoSpace,
            ControlError::NotFound("vdisk x".into()),
            ControlError::Exists("vdisk x exists".into()),
            ControlError::Invalid("bad".into()),
            ControlError::InUse("vdisk x has clients".into()),
            ControlError::Unavailable("down".into()),
            ControlError::Storage("disk".into()),
            ControlError::Retry {
                after_ms: 250,
                reason: "grace".into(),
            },
        ] {
            assert_eq!(error_from_status(&error_to_status(&e)), e);
            assert_eq!(error_from_pb(error_to_pb(&e)), e);
        }
        let transport = tonic::Status::unavailable("connection refused");
        assert!(matches!(
            error_from_status(&transport),
            ControlError::Unavailable(_)
        ));
    }

    #[test]
    fn malformed_tables_are_refused() {
        let mut e = entry_to_pb(&sample_entries()[0]);
        e.end = e.begin;
        assert!(entry_from_pb(&e).is_err());
        let mut e = entry_to_pb(&sample_entries()[0]);
        e.state = 99;
        assert!(entry_from_pb(&e).is_err());
        let u = pb::RangeUpdate {
            vdisk: 1,
            generation: 1,
            begin: 256,
            end: 512,
            entries: vec![entry_to_pb(&sample_entries()[0])],
            change: false,
            copies: Vec::new(),
        };
        assert!(update_from_pb(&u).is_err(), "entry outside the range");
        let f = pb::Fault {
            segment_begin: 4,
            segment_end: 4,
            ..Default::default()
        };
        assert!(fault_from_pb(f).is_err());
    }

    #[test]
    fn a_standby_answer_names_the_leader_when_it_knows_one() {
        let s = not_leader(Some("http://127.0.0.1:7001"));
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(is_not_leader(&s), "{s:?}");
        assert_eq!(leader_hint(&s).as_deref(), Some("http://127.0.0.1:7001"));
        assert!(s.message().contains("http://127.0.0.1:7001"), "{s:?}");
        // Without a details payload the agent counts it as "controller unavailable", which
        // its I/O retries until the fault wait runs out.
        assert!(matches!(
            error_from_status(&s),
            ControlError::Unavailable(_)
        ));

        let none = not_leader(None);
        assert!(is_not_leader(&none));
        assert_eq!(leader_hint(&none), None);
        assert!(none.message().contains("no leader is known"), "{none:?}");

        // Other failures are not mistaken for a standby's answer.
        let other = tonic::Status::unavailable("connection refused");
        assert!(!is_not_leader(&other));
        assert_eq!(leader_hint(&other), None);
        assert!(!is_not_leader(&error_to_status(
            &ControlError::Unavailable("session 3 of agent 'a' is over; register again".into())
        )));
    }

    #[test]
    fn the_leader_hint_survives_the_trip_through_http() {
        // A standby's answer goes out as an HTTP response's headers (gRPC trailers-only).
        let resp: tonic::codegen::http::Response<()> =
            not_leader(Some("http://10.0.0.7:7700")).into_http();
        let back = tonic::Status::from_header_map(resp.headers()).expect("a grpc status");
        assert!(is_not_leader(&back), "{back:?}");
        assert_eq!(leader_hint(&back).as_deref(), Some("http://10.0.0.7:7700"));
        // An unusable URL (not a header value) is left out rather than failing the answer.
        assert_eq!(leader_hint(&not_leader(Some("http://bad\nhost"))), None);
    }
}
