//! Sizes: the block unit of mapping tables, and parsing/printing of human sizes
//! (`512`, `4K`, `1M`, `10G`, `1T`).

use thiserror::Error;

/// The unit of every mapping table and free map: 4 KiB. Vdisk, segment and container sizes
/// are multiples of it; NBD I/O at any byte offset is translated through it.
pub const BLOCK_SIZE: u64 = 4096;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("empty size: give a number with an optional suffix K, M, G, T or P (e.g. 10G)")]
    Empty,
    #[error("invalid size '{0}': use a number with an optional suffix K, M, G, T or P (e.g. 10G)")]
    Invalid(String),
    #[error("size '{0}' is too large")]
    Overflow(String),
}

/// Parses `512`, `4K`, `4KiB`, `1M`, `10G`, `1T` (binary multiples, case-insensitive).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(SizeError::Empty);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    if digits.is_empty() {
        return Err(SizeError::Invalid(text.to_string()));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| SizeError::Overflow(text.to_string()))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        _ => return Err(SizeError::Invalid(text.to_string())),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(text.to_string()))
}

/// Prints a byte count with the largest binary suffix that divides it exactly, or with one
/// decimal otherwise (`10G`, `1.5G`, `4K`, `123`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(u32, &str); 5] = [(50, "P"), (40, "T"), (30, "G"), (20, "M"), (10, "K")];
    for (shift, name) in UNITS {
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

#[cfg(test)]
mod tests {
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
        assert!(matches!(
            parse_size("99999999P"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn formats_round() {
        assert_eq!(format_size(10 << 30), "10G");
        assert_eq!(format_size(1536 << 20), "1.5G");
        assert_eq!(format_size(100), "100");
    }
}
