//! Human-readable output (tables) and `--json`.

use std::fmt::Write as _;

use anyhow::Result;
use serde::Serialize;
use tabula_api::admin::{
    CheckView, ContainerView, DiffView, MapView, SnapshotView, StatusView, VdiskView,
};
use tabula_core::format_size;

pub fn print<T: Serialize>(v: &T, json: bool, human: fn(&T) -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        print!("{}", human(v));
    }
    Ok(())
}

fn pct(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "0%".into();
    }
    format!("{:.1}%", part as f64 * 100.0 / whole as f64)
}

pub fn vdisk_table(list: &Vec<VdiskView>) -> String {
    let mut s = format!(
        "{:<24} {:>10} {:>10} {:>8} {:>8}\n",
        "NAME", "SIZE", "ALLOCATED", "SEGMENT", "ENTRIES"
    );
    for v in list {
        let _ = writeln!(
            s,
            "{:<24} {:>10} {:>10} {:>8} {:>8}",
            v.name,
            format_size(v.size),
            format_size(v.allocated),
            format_size(v.segment_size),
            v.entries
        );
    }
    if list.is_empty() {
        s.push_str("(no vdisks: create one with `tabula vdisk create NAME --size 10G`)\n");
    }
    s
}

pub fn vdisk_detail(v: &VdiskView) -> String {
    format!(
        "name:        {}\nid:          {}\nsize:        {} ({} bytes)\nallocated:   {} ({})\nshared:      {} (with snapshots and clones)\nsegment:     {}\nentries:     {}\ngeneration:  {}\ncreated:     {}\ncow:         {}\norigin:      {}\nsnapshots:   {}\n",
        v.name,
        v.id,
        format_size(v.size),
        v.size,
        format_size(v.allocated),
        pct(v.allocated, v.size),
        format_size(v.shared),
        format_size(v.segment_size),
        v.entries,
        v.generation,
        time(v.created),
        v.cow,
        v.origin.as_deref().unwrap_or("-"),
        if v.snapshots.is_empty() {
            "-".to_string()
        } else {
            v.snapshots.join(", ")
        }
    )
}

fn time(secs: u64) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

pub fn snapshot_table(list: &Vec<SnapshotView>) -> String {
    let mut s = format!(
        "{:<32} {:<20} {:>10} {:>10} {:>10}\n",
        "SNAPSHOT", "CREATED", "SIZE", "ALLOCATED", "UNIQUE"
    );
    for v in list {
        let _ = writeln!(
            s,
            "{:<32} {:<20} {:>10} {:>10} {:>10}",
            v.name,
            time(v.created).to_string(),
            format_size(v.size),
            format_size(v.allocated),
            format_size(v.unique)
        );
    }
    if list.is_empty() {
        s.push_str("(no snapshots: take one with `tabula snapshot create VDISK NAME`)\n");
    }
    s
}

pub fn snapshot_detail(v: &SnapshotView) -> String {
    snapshot_table(&vec![v.clone()])
}

pub fn diff(d: &DiffView) -> String {
    let mut s = format!(
        "{} -> {}: {} in {} range(s)\n",
        d.from,
        d.to,
        format_size(d.changed),
        d.ranges.len()
    );
    for r in &d.ranges {
        let _ = writeln!(s, "{:>16} {:>12}", r.offset, r.length);
    }
    s
}

pub fn map_table(m: &MapView) -> String {
    let mut s = format!(
        "vdisk {} ({}), generation {}, {} entries; unlisted ranges are unallocated and read as zeros\n",
        m.name,
        format_size(m.size),
        m.generation,
        m.entries.len()
    );
    let _ = writeln!(
        s,
        "{:>16} {:>16} {:<9} {:<16} {:>16}",
        "OFFSET", "LENGTH", "STATE", "CONTAINER", "PHYSICAL"
    );
    for e in &m.entries {
        let _ = writeln!(
            s,
            "{:>16} {:>16} {:<9} {:<16} {:>16}",
            e.offset,
            e.length,
            e.state,
            e.container.as_deref().unwrap_or("-"),
            e.physical_offset
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into())
        );
    }
    s
}

pub fn container_table(list: &Vec<ContainerView>) -> String {
    let mut s = format!(
        "{:<16} {:<6} {:<9} {:>10} {:>10} {:>10} {:>6}  LOCATION\n",
        "NAME", "KIND", "STATE", "SIZE", "USED", "FREE", "USED%"
    );
    for c in list {
        let _ = writeln!(
            s,
            "{:<16} {:<6} {:<9} {:>10} {:>10} {:>10} {:>6}  {}",
            c.name,
            c.kind,
            c.state,
            format_size(c.size),
            format_size(c.used),
            format_size(c.free),
            pct(c.used, c.size),
            c.path
        );
        for line in container_problems(c) {
            let _ = writeln!(s, "  {line}");
        }
    }
    s
}

/// What an operator must know about a container beyond its numbers.
fn container_problems(c: &ContainerView) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(e) = &c.error {
        out.push(format!(
            "FAILED for {:.1}s: {e}; I/O to it fails until it answers again",
            c.failed_for_ms.unwrap_or(0) as f64 / 1000.0
        ));
    }
    for u in &c.unreachable_from {
        out.push(format!("path down from agent {u}"));
    }
    if c.low_space {
        out.push("low on space".to_string());
    }
    if let Some(d) = &c.drain {
        out.push(format!(
            "drain {}: {} of {} moved ({}/s){}",
            d.state,
            format_size(d.moved),
            format_size(d.total),
            format_size(d.rate),
            d.error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ));
    }
    out
}

pub fn container_detail(c: &ContainerView) -> String {
    let mut s = format!(
        "name:     {}\nid:       {}\nkind:     {}\nlocation: {}\nstate:    {}\nsize:     {}\nused:     {} ({})\nfree:     {}\nzeroing:  {}\nagents:   {}\n",
        c.name,
        c.id,
        c.kind,
        c.path,
        c.state,
        format_size(c.size),
        format_size(c.used),
        pct(c.used, c.size),
        format_size(c.free),
        format_size(c.zeroing),
        if c.agents.is_empty() {
            "-".to_string()
        } else {
            c.agents.join(", ")
        }
    );
    for line in container_problems(c) {
        let _ = writeln!(s, "          {line}");
    }
    s
}

pub fn status(s: &StatusView) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "data dir:     {}", s.data_dir);
    let _ = writeln!(
        o,
        "capacity:     {}  allocated {} ({})  free {}{}",
        format_size(s.capacity),
        format_size(s.allocated),
        pct(s.allocated, s.capacity),
        format_size(s.free),
        if s.zeroing > 0 {
            format!("  zeroing {}", format_size(s.zeroing))
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        o,
        "vdisks:       {} ({} provisioned, {} of capacity)",
        s.vdisks,
        format_size(s.provisioned),
        pct(s.provisioned, s.capacity)
    );
    if s.out_of_space {
        let _ = writeln!(
            o,
            "OUT OF SPACE: allocating writes fail with ENOSPC ({} refused); add a container with `tabula container add`",
            s.enospc_faults
        );
    }
    if s.low_space && !s.out_of_space {
        let _ = writeln!(
            o,
            "LOW ON SPACE: add a container with `tabula container add` or free space"
        );
    }
    if !s.controllers.is_empty() {
        // The leader's applied record is the newest: a standby's distance from it is how far
        // behind it follows.
        let newest = s.controllers.iter().map(|c| c.applied).max().unwrap_or(0);
        let _ = writeln!(o, "controllers:");
        for c in &s.controllers {
            let behind = newest - c.applied;
            let _ = writeln!(
                o,
                "  {:<16} {:<8} {:<28} applied {}{}",
                c.name,
                c.role,
                c.api,
                c.applied,
                if c.role == "leader" {
                    format!(" (epoch {})", c.epoch)
                } else if behind > 0 {
                    format!(" ({behind} behind)")
                } else {
                    String::new()
                }
            );
        }
    }
    let _ = writeln!(o, "containers:");
    for c in &s.containers {
        let _ = writeln!(
            o,
            "  {:<16} {:<9} {:>10} used of {:>10} ({})  {}",
            c.name,
            c.state,
            format_size(c.used),
            format_size(c.size),
            pct(c.used, c.size),
            c.path
        );
        for line in container_problems(c) {
            let _ = writeln!(o, "    {line}");
        }
    }
    let _ = writeln!(o, "agents:");
    for a in &s.agents {
        let state = match (a.connected, a.lease_ms_left) {
            (_, None) => "in-process".to_string(),
            (true, Some(ms)) => format!("connected, lease {:.1}s", ms as f64 / 1000.0),
            (false, Some(0)) => "gone (lease expired)".to_string(),
            (false, Some(ms)) => format!("DISCONNECTED, lease {:.1}s", ms as f64 / 1000.0),
        };
        // A table copy behind the controller's is normal for a moment (changes are in
        // flight or heartbeats lag); the generations let an operator see one that stays.
        let tables = if a.tables.is_empty() {
            "-".to_string()
        } else {
            a.tables
                .iter()
                .map(|t| match t.generation {
                    Some(g) if g == t.controller_generation => format!("{} (g{g})", t.vdisk),
                    Some(g) => format!("{} (g{g} of g{})", t.vdisk, t.controller_generation),
                    None => format!("{} (g? of g{})", t.vdisk, t.controller_generation),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(o, "  {:<16} {:<28} exporting {}", a.name, state, tables);
        if a.table_mismatches > 0 || a.gaps_healed > 0 {
            let _ = writeln!(
                o,
                "  {:<16} {} table mismatch(es) found by periodic replacement, {} missed change(s) healed",
                "", a.table_mismatches, a.gaps_healed
            );
        }
    }
    o
}

pub fn check(c: &CheckView) -> String {
    let mut o = format!(
        "checked {} containers, {} tables, {} entries: {} mapped ({} shared), {} free, {} waiting to be zeroed, {} being copied\n",
        c.containers,
        c.vdisks,
        c.entries,
        format_size(c.mapped),
        format_size(c.shared),
        format_size(c.free),
        format_size(c.zeroing),
        format_size(c.copying)
    );
    let _ = writeln!(o, "container labels verified: {}", c.labels);
    for n in &c.notes {
        let _ = writeln!(o, "  note: {n}");
    }
    if c.ok {
        o.push_str("OK: no invariant is violated\n");
    } else {
        let _ = writeln!(o, "FAILED: {} problem(s):", c.problems.len());
        for p in &c.problems {
            let _ = writeln!(o, "  - {p}");
        }
    }
    o
}

/// Follows a drain or migration with a progress bar until it ends; fails if it failed.
pub fn follow_move(
    client: &crate::client::Client,
    kind: &str,
    subject: &str,
) -> anyhow::Result<()> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("{kind} {subject}"));
    loop {
        let moves = client.moves()?;
        let Some(m) = moves
            .iter()
            .find(|m| m.kind == kind && m.subject == subject)
        else {
            anyhow::bail!("the controller no longer knows of the {kind} of {subject}");
        };
        bar.set_length(m.total);
        bar.set_position(m.moved);
        match m.state.as_str() {
            "running" => std::thread::sleep(std::time::Duration::from_millis(200)),
            "failed" => {
                bar.abandon();
                anyhow::bail!(
                    "{kind} of {subject} failed after moving {}: {}",
                    format_size(m.moved),
                    m.error.clone().unwrap_or_default()
                );
            }
            "cancelled" => {
                bar.abandon();
                anyhow::bail!(
                    "{kind} of {subject} was cancelled after moving {}",
                    format_size(m.moved)
                );
            }
            _ => {
                bar.finish_and_clear();
                eprintln!(
                    "moved {} in {:.1}s ({}/s)",
                    format_size(m.moved),
                    m.elapsed_ms as f64 / 1000.0,
                    format_size(m.rate)
                );
                return Ok(());
            }
        }
    }
}
