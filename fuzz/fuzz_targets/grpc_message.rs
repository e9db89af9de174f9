//! Fuzzes what crosses the controller/agent channel: protobuf decoding (prost) and the
//! checked conversions of tabula-proto, then installs whatever is accepted into an agent's
//! volume the way the agent would. Nothing the peer sends may panic either side, and an
//! accepted table must satisfy the table's invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tabula_agent::volume::Volume;
use tabula_api::{Command, TableSnapshot};
use tabula_core::{Generation, VdiskId};
use tabula_proto::pb;

fn volume() -> Volume {
    Volume::from_snapshot(TableSnapshot {
        vdisk: VdiskId(1),
        name: "fuzz".into(),
        size_bytes: 64 << 20,
        segment_blocks: 256,
        generation: Generation(5),
        read_only: false,
        entries: Vec::new(),
    })
    .expect("empty table")
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 3 {
        // Agent side: a message down the session stream.
        0 => {
            let Ok(m) = pb::ControllerMessage::decode(bytes) else {
                return;
            };
            let Some(pb::controller_message::Msg::Command(c)) = m.msg else {
                return;
            };
            let Ok((_, cmd)) = tabula_proto::command_from_pb(c) else {
                return;
            };
            let vol = volume();
            match cmd {
                Command::Update(u) => vol.install(&u),
                Command::Allocated(u) => vol.install_answer(&u),
                Command::SetState {
                    generation,
                    range,
                    state,
                    ..
                } => vol.set_state(generation, range, state),
                Command::Replace(s) => {
                    let _ = vol.replace(&s);
                }
                Command::Block { .. }
                | Command::Unblock { .. }
                | Command::Detach { .. }
                | Command::ContainerHealth { .. } => {}
            }
            vol.check_table().expect("the table stays valid");
        }
        // Agent side: a table answering OpenVdisk.
        1 => {
            let Ok(s) = pb::TableSnapshot::decode(bytes) else {
                return;
            };
            if let Ok(snap) = tabula_proto::snapshot_from_pb(s) {
                if let Ok(vol) = Volume::from_snapshot(snap) {
                    vol.check_table().expect("an accepted table is valid");
                }
            }
        }
        // Controller side: a fault.
        _ => {
            let Ok(f) = pb::FaultRequest::decode(bytes) else {
                return;
            };
            if let Some(f) = f.fault {
                if let Ok(fault) = tabula_proto::fault_from_pb(f) {
                    assert!(fault.segments.0 < fault.segments.1);
                }
            }
        }
    }
});
