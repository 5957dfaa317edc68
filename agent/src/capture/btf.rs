//! Field offsets of kernel structures from the running kernel's BTF.
//!
//! Written by hand on purpose: the eBPF programs need a dozen member offsets
//! (Rust eBPF has no CO-RE relocations), aya's `Btf` keeps its type and member
//! accessors crate-private, and the one crate that exposes them (btf-rs) is
//! LGPL. Parsing the BTF type section for struct members is ~150 lines.

use std::{collections::HashMap, path::Path};

use agent_common::KernelOffsets;

/// Where the running kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no struct `{0}`")]
    NoStruct(String),
    #[error("kernel BTF struct `{0}` has no member `{1}`")]
    NoMember(String, String),
    #[error("member `{0}.{1}` is a bitfield or has size {2}, expected {3}")]
    UnexpectedLayout(String, String, u32, u32),
}

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, Clone)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
    bitfield_size: u32,
}

#[derive(Debug, Clone)]
struct Type {
    name_off: u32,
    kind: u32,
    /// Size for INT/STRUCT/UNION/ENUM, referenced type for PTR/TYPEDEF/modifiers.
    size_or_type: u32,
    members: Vec<Member>,
    /// For ARRAY: element type and count.
    array: Option<(u32, u32)>,
}

/// The parsed type section of a BTF blob.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    structs: HashMap<String, u32>,
}

/// A resolved member: byte offset from the start of its outermost struct.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberInfo {
    pub offset: u32,
    pub size: u32,
    pub bitfield: bool,
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, BtfError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, BtfError> {
        let path = path.as_ref();
        let data = std::fs::read(path).map_err(|source| BtfError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data)
    }

    /// Parses a little-endian BTF blob.
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if data.len() < 24 || data[0..2] != [0x9f, 0xeb] {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types_bytes = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::Malformed("type section out of range"))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of range"))?
            .to_vec();
        // Type id 0 is `void`.
        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            size_or_type: 0,
            members: vec![],
            array: None,
        }];
        let mut pos = 0;
        while pos < types_bytes.len() {
            let name_off = u32_at(types_bytes, pos)?;
            let info = u32_at(types_bytes, pos + 4)?;
            let size_or_type = u32_at(types_bytes, pos + 8)?;
            pos += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut t = Type {
                name_off,
                kind,
                size_or_type,
                members: vec![],
                array: None,
            };
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => pos += 4,
                KIND_ARRAY => {
                    t.array = Some((u32_at(types_bytes, pos)?, u32_at(types_bytes, pos + 8)?));
                    pos += 12;
                }
                KIND_STRUCT | KIND_UNION => {
                    for _ in 0..vlen {
                        let offset = u32_at(types_bytes, pos + 8)?;
                        let (bit_offset, bitfield_size) = if kind_flag {
                            (offset & 0xff_ffff, offset >> 24)
                        } else {
                            (offset, 0)
                        };
                        t.members.push(Member {
                            name_off: u32_at(types_bytes, pos)?,
                            type_id: u32_at(types_bytes, pos + 4)?,
                            bit_offset,
                            bitfield_size,
                        });
                        pos += 12;
                    }
                }
                KIND_ENUM | KIND_FUNC_PROTO => pos += 8 * vlen,
                KIND_DATASEC | KIND_ENUM64 => pos += 12 * vlen,
                0..=19 => {}
                _ => return Err(BtfError::Malformed("unknown type kind")),
            }
            types.push(t);
        }
        let mut btf = Self {
            types,
            strings,
            structs: HashMap::new(),
        };
        for (id, t) in btf.types.iter().enumerate() {
            if t.kind == KIND_STRUCT && t.name_off != 0 {
                let name = btf.name(t.name_off).to_string();
                btf.structs.entry(name).or_insert(id as u32);
            }
        }
        Ok(btf)
    }

    fn name(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some(t),
            }
        }
        None
    }

    fn size_of(&self, id: u32) -> u32 {
        match self.resolve(id) {
            Some(t) => match t.kind {
                KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 => t.size_or_type,
                KIND_PTR => 8,
                KIND_ARRAY => t.array.map_or(0, |(elem, n)| self.size_of(elem) * n),
                _ => 0,
            },
            None => 0,
        }
    }

    /// Searches `ty`'s members, descending into anonymous structs and unions.
    fn find(&self, ty: &Type, name: &str, base_bits: u32) -> Option<MemberInfo> {
        for m in &ty.members {
            let bits = base_bits + m.bit_offset;
            if m.name_off != 0 && self.name(m.name_off) == name {
                return Some(MemberInfo {
                    offset: bits / 8,
                    size: self.size_of(m.type_id),
                    bitfield: m.bitfield_size != 0 || !bits.is_multiple_of(8),
                });
            }
            if m.name_off == 0 {
                if let Some(inner) = self.resolve(m.type_id) {
                    if let Some(found) = self.find(inner, name, bits) {
                        return Some(found);
                    }
                }
            }
        }
        None
    }

    /// Offset of `member` (possibly inside anonymous unions) in struct `name`.
    pub fn member(&self, strukt: &str, member: &str) -> Result<MemberInfo, BtfError> {
        let id = *self
            .structs
            .get(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.into()))?;
        let ty = &self.types[id as usize];
        self.find(ty, member, 0)
            .ok_or_else(|| BtfError::NoMember(strukt.into(), member.into()))
    }

    /// Like [`Btf::member`], and checks the member is a whole field of `size` bytes.
    fn field(&self, strukt: &str, member: &str, size: u32) -> Result<u32, BtfError> {
        let m = self.member(strukt, member)?;
        if m.bitfield || m.size != size {
            return Err(BtfError::UnexpectedLayout(
                strukt.into(),
                member.into(),
                m.size,
                size,
            ));
        }
        Ok(m.offset)
    }

    /// Every offset the capture programs need.
    pub fn kernel_offsets(&self) -> Result<KernelOffsets, BtfError> {
        let common_id = *self
            .structs
            .get("sock_common")
            .ok_or_else(|| BtfError::NoStruct("sock_common".into()))?;
        let sk_common = self.field("sock", "__sk_common", self.size_of(common_id))?;
        Ok(KernelOffsets {
            task_files: self.field("task_struct", "files", 8)?,
            task_group_leader: self.field("task_struct", "group_leader", 8)?,
            task_comm: self.field("task_struct", "comm", 16)?,
            files_fdt: self.field("files_struct", "fdt", 8)?,
            fdtable_max_fds: self.field("fdtable", "max_fds", 4)?,
            fdtable_fd: self.field("fdtable", "fd", 8)?,
            file_private_data: self.field("file", "private_data", 8)?,
            file_inode: self.field("file", "f_inode", 8)?,
            inode_mode: self.field("inode", "i_mode", 2)?,
            socket_type: self.field("socket", "type", 2)?,
            socket_sk: self.field("socket", "sk", 8)?,
            sock_protocol: self.field("sock", "sk_protocol", 2)?,
            skc_family: sk_common + self.field("sock_common", "skc_family", 2)?,
            skc_daddr: sk_common + self.field("sock_common", "skc_daddr", 4)?,
            skc_rcv_saddr: sk_common + self.field("sock_common", "skc_rcv_saddr", 4)?,
            skc_dport: sk_common + self.field("sock_common", "skc_dport", 2)?,
            skc_num: sk_common + self.field("sock_common", "skc_num", 2)?,
            skc_v6_daddr: sk_common + self.field("sock_common", "skc_v6_daddr", 16)?,
            skc_v6_rcv_saddr: sk_common + self.field("sock_common", "skc_v6_rcv_saddr", 16)?,
            // Offsets from the start of tcp_sock, which begins with its
            // struct sock (through inet_connection_sock and inet_sock).
            tcp_write_seq: self.field("tcp_sock", "write_seq", 4)?,
            tcp_copied_seq: self.field("tcp_sock", "copied_seq", 4)?,
            tcp_rcv_nxt: self.field("tcp_sock", "rcv_nxt", 4)?,
            skc_flags: sk_common + self.field("sock_common", "skc_flags", 8)?,
            _pad: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob from (name, info, size_or_type, extra words) entries.
    fn blob(types: &[(u32, u32, u32, Vec<u32>)], strings: &[u8]) -> Vec<u8> {
        let mut tbytes = Vec::new();
        for (name, info, st, extra) in types {
            for w in [*name, *info, *st].iter().chain(extra) {
                tbytes.extend_from_slice(&w.to_le_bytes());
            }
        }
        let mut out = vec![0x9f, 0xeb, 1, 0];
        for w in [
            24u32,
            0,
            tbytes.len() as u32,
            tbytes.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&tbytes);
        out.extend_from_slice(strings);
        out
    }

    #[test]
    fn finds_members_through_anonymous_unions_and_typedefs() {
        // strings: 0:"" 1:"u16" 5:"s" 7:"a" 9:"b" 11:"t"
        let strings = b"\0u16\0s\0a\0b\0t\0";
        let types = vec![
            (1, KIND_INT << 24, 2, vec![16]),                         // 1: u16
            (11, KIND_TYPEDEF << 24, 1, vec![]),                      // 2: t = u16
            (0, (KIND_UNION << 24) | 1, 2, vec![9, 2, 0]),            // 3: union { t b; }
            (5, (KIND_STRUCT << 24) | 2, 8, vec![7, 1, 0, 0, 3, 32]), // 4: struct s { u16 a; union @4 }
        ];
        let btf = Btf::parse(&blob(&types, strings)).unwrap();
        assert_eq!(
            btf.member("s", "a").unwrap(),
            MemberInfo {
                offset: 0,
                size: 2,
                bitfield: false
            }
        );
        assert_eq!(
            btf.member("s", "b").unwrap(),
            MemberInfo {
                offset: 4,
                size: 2,
                bitfield: false
            }
        );
        assert!(matches!(btf.member("s", "c"), Err(BtfError::NoMember(..))));
        assert!(matches!(btf.member("x", "a"), Err(BtfError::NoStruct(..))));
    }

    #[test]
    fn bitfields_are_flagged() {
        let strings = b"\0u16\0s\0a\0";
        let types = vec![
            (1, KIND_INT << 24, 2, vec![16]),
            // kind_flag set: offset word = (bitfield size << 24) | bit offset
            (
                5,
                (1 << 31) | (KIND_STRUCT << 24) | 1,
                4,
                vec![7, 1, (4 << 24) | 8],
            ),
        ];
        let btf = Btf::parse(&blob(&types, strings)).unwrap();
        assert!(btf.member("s", "a").unwrap().bitfield);
        assert!(matches!(
            btf.field("s", "a", 2),
            Err(BtfError::UnexpectedLayout(..))
        ));
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(b"not btf at all, not even close").is_err());
        let mut b = blob(&[(0, KIND_INT << 24, 4, vec![32])], b"\0");
        b.truncate(b.len() - 6);
        assert!(Btf::parse(&b).is_err());
    }

    #[test]
    fn running_kernel_offsets_resolve() {
        if !Path::new(VMLINUX_BTF).exists() {
            eprintln!("skipping: {VMLINUX_BTF} not present");
            return;
        }
        let btf = Btf::from_file(VMLINUX_BTF).unwrap();
        let o = btf.kernel_offsets().unwrap();
        // sock_common is the first member of struct sock on every kernel.
        assert!(o.skc_family < 64 && o.skc_num < 64 && o.skc_dport < 64);
        assert_ne!(o.task_files, 0);
        assert_ne!(o.skc_v6_daddr, o.skc_v6_rcv_saddr);
        // tcp_sock's own fields lie past the struct sock it starts with.
        let sock_size = btf.size_of(btf.structs["sock"]);
        assert!(
            o.tcp_write_seq >= sock_size && o.tcp_copied_seq >= sock_size,
            "{o:?}"
        );
        assert_ne!(o.tcp_write_seq, o.tcp_copied_seq);
    }
}
