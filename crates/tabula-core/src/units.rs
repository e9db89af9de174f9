//! Sizes: the block unit of mapping tables, parsing and printing of human sizes (`512`, `4K`,
//! `1M`, `10G`, `1T`, `2E`), and the one place that says which vdisk, segment and container
//! sizes are accepted ([`check_vdisk_size`], [`check_segment_size`],
//! [`check_container_size`]): every entry point (create, resize, clone, rollback, the
//! default container of `serve` and `controller`) goes through them, so the limits and their
//! messages are the same everywhere.
//!
//! The grammar of a size, case-insensitive: a decimal number of bytes, optionally followed
//! (spaces allowed in between) by a unit `K`, `M`, `G`, `T`, `P` or `E`, each 1024 times the
//! one before, itself optionally followed by `i`, `iB` or `B`, all of which mean the same
//! (`1G` = `1Gi` = `1GiB` = `1GB` = 2^30 bytes); a lone `B` means bytes. There are no
//! decimal (power-of-1000) units and no fractions: every size is an exact byte count.

use std::fmt;

use thiserror::Error;

/// The unit of every mapping table and free map: 4 KiB. Vdisk, segment and container sizes
/// are multiples of it; NBD I/O at any byte offset is translated through it.
pub const BLOCK_SIZE: u64 = 4096;

/// The largest vdisk: 4 EiB. NBD carries sizes as unsigned 64-bit numbers, but clients hold
/// them signed (libnbd's `nbdinfo` printed 16383P as a negative size; qemu caps images
/// just under 2^63), so a size must stay well inside 2^63.
pub const MAX_VDISK_SIZE: u64 = 1 << 62;
/// The smallest segment: one block.
pub const MIN_SEGMENT_SIZE: u64 = BLOCK_SIZE;
/// The largest segment: 1 GiB (LVM thin's largest chunk too). A segment is allocated in
/// one piece of one container and copied whole by the first write after a snapshot, so a
/// larger one would need that much contiguous free space and delay that write by as much
/// copying.
pub const MAX_SEGMENT_SIZE: u64 = 1 << 30;
/// The allocation unit of a vdisk created without `--segment-size`.
pub const DEFAULT_SEGMENT_SIZE: u64 = 1 << 20;
/// The largest container file tabula creates: 4 EiB (file sizes are signed 64-bit too).
pub const MAX_CONTAINER_SIZE: u64 = 1 << 62;

/// The binary units, smallest first, with their shifts.
const UNITS: [(char, u32); 6] = [
    ('K', 10),
    ('M', 20),
    ('G', 30),
    ('T', 40),
    ('P', 50),
    ('E', 60),
];

const GRAMMAR: &str = "a number of bytes with an optional binary unit K, M, G, T, P or E \
(Ki, KiB and KB all mean 1024; e.g. 10G)";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("empty size: give {GRAMMAR}")]
    Empty,
    #[error("invalid size '{0}': give {GRAMMAR}")]
    Invalid(String),
    #[error("size '{0}' is too large: sizes must be under 16E (2^64 bytes)")]
    Overflow(String),
}

/// Parses a size by the grammar in the module documentation: `512`, `4K`, `4KiB`, `4kb`,
/// `10 G`, `1E`.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(SizeError::Empty);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, rest) = t.split_at(split);
    if digits.is_empty() {
        return Err(SizeError::Invalid(text.to_string()));
    }
    let shift =
        unit_shift(rest.trim_start()).ok_or_else(|| SizeError::Invalid(text.to_string()))?;
    // Only digits here, so the one way to fail is a number beyond u64.
    let n: u64 = digits
        .parse()
        .map_err(|_| SizeError::Overflow(text.to_string()))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(text.to_string()))
}

/// The shift of a unit suffix (`""`, `B`, `K`, `Ki`, `KiB`, `KB`, ...), case-insensitive.
fn unit_shift(suffix: &str) -> Option<u32> {
    let s = suffix.to_ascii_uppercase();
    if s.is_empty() || s == "B" {
        return Some(0);
    }
    let mut chars = s.chars();
    let letter = chars.next()?;
    let (_, shift) = UNITS.iter().find(|(u, _)| *u == letter)?;
    matches!(chars.as_str(), "" | "I" | "IB" | "B").then_some(*shift)
}

/// Prints a byte count with the largest binary suffix that divides it exactly, or with one
/// decimal otherwise (`10G`, `1.5G`, `4K`, `123`). For display only: the decimal form is
/// rounded; [`format_size_exact`] prints what [`parse_size`] reads back.
pub fn format_size(bytes: u64) -> String {
    for &(name, shift) in UNITS.iter().rev() {
        let unit = 1u64 << shift;
        if bytes >= unit {
            if bytes % unit == 0 {
                return format!("{}{name}", bytes / unit);
            }
            return format!("{:.1}{name}", bytes as f64 / unit as f64);
        }
    }
    bytes.to_string()
}

/// Prints a byte count exactly, with the largest binary suffix that divides it (`10G`,
/// `1048580K`, `4095`); [`parse_size`] reads it back to the same number.
pub fn format_size_exact(bytes: u64) -> String {
    for &(name, shift) in UNITS.iter().rev() {
        let unit = 1u64 << shift;
        if bytes != 0 && bytes % unit == 0 {
            return format!("{}{name}", bytes / unit);
        }
    }
    bytes.to_string()
}

/// What a size limit applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantity {
    VdiskSize,
    SegmentSize,
    ContainerSize,
}

impl Quantity {
    /// The accepted range, inclusive.
    pub fn range(self) -> (u64, u64) {
        match self {
            Quantity::VdiskSize => (BLOCK_SIZE, MAX_VDISK_SIZE),
            Quantity::SegmentSize => (MIN_SEGMENT_SIZE, MAX_SEGMENT_SIZE),
            Quantity::ContainerSize => (BLOCK_SIZE, MAX_CONTAINER_SIZE),
        }
    }

    /// What every accepted value is, besides being in range.
    fn rule(self) -> &'static str {
        match self {
            Quantity::SegmentSize => "a power of two",
            Quantity::VdiskSize | Quantity::ContainerSize => "a multiple of the block size (4K)",
        }
    }

    /// Checks `size` against this quantity's limits.
    pub fn check(self, size: u64) -> Result<(), LimitError> {
        let (min, max) = self.range();
        if size < min || size > max {
            return Err(LimitError::OutOfRange {
                what: self,
                size,
                min,
                max,
            });
        }
        if self == Quantity::SegmentSize && !size.is_power_of_two() {
            // Inside the range, so both neighbours are too.
            let up = size.next_power_of_two();
            return Err(LimitError::NotPowerOfTwo {
                size,
                down: up / 2,
                up,
            });
        }
        if size % BLOCK_SIZE != 0 {
            // At most `max`, which is a multiple of the block size, so rounding up stays in.
            return Err(LimitError::Unaligned {
                what: self,
                size,
                up: size.next_multiple_of(BLOCK_SIZE),
            });
        }
        Ok(())
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Quantity::VdiskSize => "vdisk size",
            Quantity::SegmentSize => "segment size",
            Quantity::ContainerSize => "container size",
        })
    }
}

/// A size outside its limits. Every value the message suggests ([`LimitError::suggestions`])
/// is itself accepted.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum LimitError {
    #[error(
        "{what} {} is out of range: it must be {} from {} to {}",
        format_size_exact(*size), what.rule(), format_size_exact(*min), format_size_exact(*max)
    )]
    OutOfRange {
        what: Quantity,
        size: u64,
        min: u64,
        max: u64,
    },
    #[error(
        "segment size {} is not a power of two: use {} or {}",
        format_size_exact(*size), format_size_exact(*down), format_size_exact(*up)
    )]
    NotPowerOfTwo { size: u64, down: u64, up: u64 },
    #[error(
        "{what} {} is not a multiple of the block size (4K): use {} (rounded up)",
        format_size_exact(*size), format_size_exact(*up)
    )]
    Unaligned { what: Quantity, size: u64, up: u64 },
}

impl LimitError {
    /// The values the message suggests.
    pub fn suggestions(&self) -> Vec<u64> {
        match *self {
            LimitError::OutOfRange { size, min, max, .. } => {
                vec![if size < min { min } else { max }]
            }
            LimitError::NotPowerOfTwo { down, up, .. } => vec![down, up],
            LimitError::Unaligned { up, .. } => vec![up],
        }
    }
}

/// A vdisk's size: a multiple of 4K from 4K to [`MAX_VDISK_SIZE`].
pub fn check_vdisk_size(size: u64) -> Result<(), LimitError> {
    Quantity::VdiskSize.check(size)
}

/// A segment size: a power of two from [`MIN_SEGMENT_SIZE`] to [`MAX_SEGMENT_SIZE`].
pub fn check_segment_size(size: u64) -> Result<(), LimitError> {
    Quantity::SegmentSize.check(size)
}

/// The size of a container file tabula creates: a multiple of 4K up to
/// [`MAX_CONTAINER_SIZE`].
pub fn check_container_size(size: u64) -> Result<(), LimitError> {
    Quantity::ContainerSize.check(size)
}

/// A vdisk's geometry, as create, clone and rollback take it: both its size and its segment
/// size.
pub fn check_vdisk_geometry(size: u64, segment_size: u64) -> Result<(), LimitError> {
    check_vdisk_size(size)?;
    check_segment_size(segment_size)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn accepts_brief_examples() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("64GiB"), Ok(64 << 30));
        assert_eq!(parse_size("2m"), Ok(2 << 20));
    }

    #[test]
    fn rejects_bad_sizes() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert!(matches!(parse_size("G"), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_size("10X"), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_size("-1"), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_size("1.5G"), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_size("1iB"), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_size("1GBB"), Err(SizeError::Invalid(_))));
        assert!(matches!(
            parse_size("99999999P"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("99999999999999999999999"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn exabytes_and_every_unit_spelling_are_binary() {
        // Regression (issue 17): `1E` was refused while `1GB` and `1GiB` both meant GiB.
        assert_eq!(parse_size("1E"), Ok(1 << 60));
        assert_eq!(parse_size("15EiB"), Ok(15 << 60));
        for unit in ["G", "g", "Gi", "GiB", "gib", "GB", "gb"] {
            assert_eq!(parse_size(&format!("3{unit}")), Ok(3 << 30), "{unit}");
        }
        assert_eq!(parse_size("10 GiB"), Ok(10 << 30));
        assert!(matches!(parse_size("16E"), Err(SizeError::Overflow(_))));
    }

    #[test]
    fn formats_round() {
        assert_eq!(format_size(10 << 30), "10G");
        assert_eq!(format_size(1536 << 20), "1.5G");
        assert_eq!(format_size(100), "100");
        assert_eq!(format_size(3 << 60), "3E");
        assert_eq!(format_size_exact((1 << 30) + 4096), "1048580K");
        assert_eq!(format_size_exact(0), "0");
    }

    #[test]
    fn limits_and_their_messages() {
        // Regression (issue 17): resize took 16383P and --segment-size 128G, 2^62, 2^63.
        let e = check_vdisk_size(16383 << 50).unwrap_err();
        assert_eq!(
            e.to_string(),
            "vdisk size 16383P is out of range: it must be a multiple of the block size (4K) from 4K to 4E"
        );
        assert_eq!(check_vdisk_size(4 << 60), Ok(()));
        assert!(check_vdisk_size(0).is_err());
        for seg in [128 << 30, 1 << 62, 1 << 63, 2 << 30, 2048, 0] {
            assert!(check_segment_size(seg).is_err(), "{seg}");
        }
        assert_eq!(
            check_segment_size(3 << 20).unwrap_err().to_string(),
            "segment size 3M is not a power of two: use 2M or 4M"
        );
        assert_eq!(
            check_segment_size(128 << 30).unwrap_err().to_string(),
            "segment size 128G is out of range: it must be a power of two from 4K to 1G"
        );
        for seg in [4096, 1 << 20, 1 << 30] {
            assert_eq!(check_segment_size(seg), Ok(()));
        }
        // Regression (issue 17): the hint for 1G + 1 was `1.0G`, which was then refused
        // (and would have meant 1G).
        let e = check_vdisk_size((1 << 30) + 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "vdisk size 1073741825 is not a multiple of the block size (4K): use 1048580K (rounded up)"
        );
        assert!(check_container_size(1 << 63).is_err());
        assert!(check_container_size(1000).is_err());
    }

    /// A size spelled with any unit in any accepted spelling and case, with or without a
    /// space.
    fn spelled() -> impl Strategy<Value = (u64, u32, String)> {
        (
            any::<u64>(),
            0usize..=UNITS.len(),
            prop::sample::select(vec!["", "i", "iB", "B", "ib", "b", "IB"]),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(n, unit, tail, lower, space)| {
                let (n, shift, suffix) = if unit == 0 {
                    (
                        n,
                        0,
                        if tail.eq_ignore_ascii_case("b") {
                            "B"
                        } else {
                            ""
                        }
                        .to_string(),
                    )
                } else {
                    let (c, shift) = UNITS[unit - 1];
                    // Mostly numbers that fit, some that overflow.
                    let n = if n % 4 == 0 { n } else { n >> (shift + 1) };
                    (n, shift, format!("{c}{tail}"))
                };
                let suffix = if lower {
                    suffix.to_ascii_lowercase()
                } else {
                    suffix
                };
                let sep = if space && !suffix.is_empty() { " " } else { "" };
                (n, shift, format!("{n}{sep}{suffix}"))
            })
    }

    proptest! {
        #[test]
        fn parses_every_spelling((n, shift, text) in spelled()) {
            let want = n.checked_mul(1u64 << shift);
            match parse_size(&text) {
                Ok(v) => prop_assert_eq!(Some(v), want, "{}", text),
                Err(SizeError::Overflow(_)) => prop_assert_eq!(want, None, "{}", text),
                Err(e) => prop_assert!(false, "{} refused: {}", text, e),
            }
        }

        #[test]
        fn exact_format_reads_back(n in any::<u64>(), shift in 0u32..64) {
            let n = n >> shift;
            prop_assert_eq!(parse_size(&format_size_exact(n)), Ok(n));
        }

        #[test]
        fn never_panics_and_errors_say_the_grammar(text in "\\PC{0,12}|[0-9 ]{0,24}[kKmMgGtTpPeEiIbB ]{0,4}") {
            if let Err(e) = parse_size(&text) {
                let msg = e.to_string();
                prop_assert!(msg.contains("binary unit") || msg.contains("under 16E"), "{}", msg);
            }
        }

        /// Every hint names a value that parses back to itself and passes the same check.
        #[test]
        fn every_hint_is_accepted(
            size in prop_oneof![any::<u64>(), 0u64..1 << 32, (0u32..64).prop_map(|s| 1u64 << s),
                                (0u32..64).prop_map(|s| (1u64 << s).wrapping_add(1))],
            which in 0usize..3,
        ) {
            let q = [Quantity::VdiskSize, Quantity::SegmentSize, Quantity::ContainerSize][which];
            if let Err(e) = q.check(size) {
                let hints = e.suggestions();
                prop_assert!(!hints.is_empty());
                for h in hints {
                    let text = format_size_exact(h);
                    prop_assert!(e.to_string().contains(&text), "{} lacks {}", e, text);
                    prop_assert_eq!(parse_size(&text), Ok(h));
                    prop_assert_eq!(q.check(h), Ok(()), "{} suggests {}", e, text);
                }
            }
        }
    }
}
