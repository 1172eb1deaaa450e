//! Just enough of a BTF reader to find one struct member's offset in the
//! running kernel (`/sys/kernel/btf/vmlinux`), so the kernel program can read
//! `tcp_sock` fields without compiled-in layouts. aya 0.14 keeps its BTF
//! parser's type accessors private and Rust programs get no CO-RE, hence this.

use std::path::Path;

/// The kernel's own BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{0} is not BTF (bad magic or truncated)")]
    Malformed(String),
    #[error("kind {kind} at type {id} is unknown to this reader")]
    UnknownKind { kind: u32, id: u32 },
    #[error("struct {0} not found in the kernel BTF")]
    NoStruct(String),
    #[error("struct {0} has no member {1}")]
    NoMember(String, String),
    #[error("{0}.{1} is a bitfield")]
    Bitfield(String, String),
}

/// Byte offset of `member` in `struct name`, from the BTF file at `path`.
pub fn member_offset(path: &Path, name: &str, member: &str) -> Result<u32, BtfError> {
    let data =
        std::fs::read(path).map_err(|source| BtfError::Read { path: path.display().to_string(), source })?;
    let malformed = || BtfError::Malformed(path.display().to_string());
    let u16_at = |at: usize| data.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |at: usize| data.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    if u16_at(0) != Some(MAGIC) {
        return Err(malformed());
    }
    let field = |at: usize| u32_at(at).map(|v| v as usize).ok_or_else(malformed);
    let header_len = field(4)?;
    let (type_off, type_len, str_off, str_len) = (field(8)?, field(12)?, field(16)?, field(20)?);
    let types = header_len + type_off..header_len + type_off + type_len;
    let strings = data.get(header_len + str_off..header_len + str_off + str_len).ok_or_else(malformed)?;
    let string = |off: u32| -> &[u8] {
        let rest = strings.get(off as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    };
    let mut at = types.start;
    let mut id = 1;
    while at < types.end {
        let (name_off, info) = (u32_at(at).ok_or_else(malformed)?, u32_at(at + 4).ok_or_else(malformed)?);
        let (kind, vlen, kind_flag) = ((info >> 24) & 0x1f, (info & 0xffff) as usize, info >> 31);
        at += 12;
        if kind == KIND_STRUCT && string(name_off) == name.as_bytes() {
            for m in 0..vlen {
                let base = at + 12 * m;
                let (m_name, m_offset) =
                    (u32_at(base).ok_or_else(malformed)?, u32_at(base + 8).ok_or_else(malformed)?);
                if string(m_name) == member.as_bytes() {
                    let bits = if kind_flag == 1 { m_offset & 0x00ff_ffff } else { m_offset };
                    if bits % 8 != 0 || (kind_flag == 1 && m_offset >> 24 != 0) {
                        return Err(BtfError::Bitfield(name.into(), member.into()));
                    }
                    return Ok(bits / 8);
                }
            }
            return Err(BtfError::NoMember(name.into(), member.into()));
        }
        at += match kind {
            // INT, VAR, DECL_TAG: one u32.
            1 | 14 | 17 => 4,
            // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG.
            2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
            // ARRAY.
            3 => 12,
            // STRUCT, UNION, DATASEC, ENUM64: 12 bytes per entry.
            4 | 5 | 15 | 19 => 12 * vlen,
            // ENUM, FUNC_PROTO: 8 bytes per entry.
            6 | 13 => 8 * vlen,
            kind => return Err(BtfError::UnknownKind { kind, id }),
        };
        id += 1;
    }
    Err(BtfError::NoStruct(name.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_tcp_sock_members_in_the_running_kernel() {
        let vmlinux = Path::new(VMLINUX);
        let write_seq = member_offset(vmlinux, "tcp_sock", "write_seq").unwrap();
        let snd_una = member_offset(vmlinux, "tcp_sock", "snd_una").unwrap();
        // struct tcp_sock begins with inet_connection_sock, far bigger than 1 KiB.
        assert!(write_seq > 1024 && snd_una > 1024, "write_seq at {write_seq}, snd_una at {snd_una}");
        assert_eq!(member_offset(vmlinux, "tcp_sock", "inet_conn").unwrap(), 0);
        assert!(matches!(member_offset(vmlinux, "tcp_sock", "no_such"), Err(BtfError::NoMember(..))));
        assert!(matches!(member_offset(vmlinux, "no_such_struct", "x"), Err(BtfError::NoStruct(_))));
    }
}
